"""A compressor applied on the client: its states for a population, and the message's shared
float leaves replaced by what the server decodes. Local leaves never reach it (they are not in
``shared``); integer leaves and BN statistics travel as they are
(``docs/robust_and_compression.md``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_bn.compress.transforms import Compressor
from fedjax_bn.policy import float_leaves, with_leaves
from fedjax_bn.tree import Variables, unflatten

Array = jax.Array


def check_compress(compress: Any, dp: Any = None) -> None:
    """One clear ValueError for a ``compress`` that is not a Compressor or cannot compose."""
    if compress is None:
        return
    if not isinstance(compress, Compressor):
        raise ValueError(
            f"compress must be a fedjax_bn.compress.Compressor (e.g. quantize(bits=4)), got "
            f"{compress!r}."
        )
    if dp is not None:
        raise ValueError(
            "dp and compress do not compose yet: DP-FedAvg clips and noises the uncompressed "
            "update. Use one of them."
        )


def update_template(shared: Variables) -> Variables:
    """Float32 zeros shaped like the shared float leaves: what a client's update looks like."""
    return unflatten({p: jnp.zeros(v.shape, jnp.float32) for p, v in float_leaves(shared).items()})


def init_states(compressor: Compressor | None, shared: Variables, num_clients: int) -> Any:
    """Every client's compressor state (leading client axis); None without a compressor."""
    if compressor is None:
        return None
    template = update_template(shared)
    return jax.vmap(lambda i: compressor.init(template, i))(jnp.arange(num_clients))


def compress_shared(
    compressor: Compressor, start: Variables, shared: Variables, state: Any, sent: Array
) -> tuple[Variables, Any]:
    """``shared`` with its float leaves replaced by ``start + decoded(shared - start)``, and the
    compressor's next state; where ``sent`` is False (the client took no step, so it sends
    nothing) the state is kept bitwise."""
    old, new = float_leaves(start), float_leaves(shared)
    update = unflatten({p: new[p].astype(jnp.float32) - old[p].astype(jnp.float32) for p in old})
    decoded, nxt = compressor.apply(update, state)
    flat = float_leaves(decoded)
    out = with_leaves(shared, {p: (old[p] + flat[p]).astype(new[p].dtype) for p in old})
    return out, jax.tree.map(lambda a, b: jnp.where(sent, a, b), nxt, state)
