"""NaN/Inf quarantine: a client whose update or loss is not finite takes no part in the round.

Every executor folds a round's client outputs through :func:`aggregate_round`: a quarantined
client gets weight zero, its message is zeroed (so ``0 * NaN`` cannot reach the mean), and its
client state is not written back (it keeps the state it started the round with). If every
client is quarantined the server state stays as it was, unless the algorithm sets
``update_empty`` (DP-FedAvg: its update is noise alone then). Algorithm-agnostic: it looks at every
float leaf of the messages and client states, never at their fields.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_bn.algorithms.base import Algorithm
from fedjax_bn.tree import is_integer_leaf

Array = jax.Array


def finite_clients(tree: Any, num_clients: int) -> Array:
    """``[C]`` bool: whether every float leaf of client ``c``'s slice of ``tree`` is finite."""
    ok = jnp.ones((num_clients,), bool)
    for leaf in jax.tree.leaves(tree):
        if not is_integer_leaf(leaf):
            ok = ok & jnp.all(jnp.isfinite(leaf.reshape(num_clients, -1)), axis=1)
    return ok


def select_clients(ok_C: Array, new: Any, old: Any) -> Any:
    """Per client: ``new`` where ``ok_C``, else ``old`` (leaves stacked on the client axis)."""

    def pick(n: Array, o: Array) -> Array:
        return jnp.where(ok_C.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)

    return jax.tree.map(pick, new, old)


def fold_finite(alg: Algorithm, server: Any, messages: Any, weights_C: Array, ok_C: Array) -> Any:
    """``alg.server_update`` over the clients in ``ok_C`` only: every other client's weight and
    message are zeroed (so ``0 * NaN`` cannot reach the mean). With no client left the server
    stays as it was, unless the algorithm sets ``update_empty``."""
    messages = select_clients(ok_C, messages, jax.tree.map(jnp.zeros_like, messages))
    w = jnp.where(ok_C, jnp.asarray(weights_C, jnp.float32), 0.0)
    if alg.update_empty:  # e.g. DP: noise is released whether or not a client took part
        return alg.server_update(server, messages, w)
    any_ok = jnp.any(w > 0)
    # With no client left, aggregate with dummy weights and keep the old server state.
    new = alg.server_update(server, messages, jnp.where(any_ok, w, 1.0))
    return jax.tree.map(lambda n, o: jnp.where(any_ok, n, o), new, server)


def aggregate_round(
    alg: Algorithm,
    server: Any,
    old_clients: Any,
    outputs: tuple[Any, Any, Any],
    weights_C: Array,
) -> tuple[Any, Any, Array]:
    """``(new server, new clients, quarantined [C] bool)`` from the stacked client outputs."""
    messages, clients, metrics = outputs
    num = weights_C.shape[0]
    ok = finite_clients((messages, clients), num) & jnp.isfinite(metrics.loss)
    clients = select_clients(ok, clients, old_clients)
    return fold_finite(alg, server, messages, weights_C, ok), clients, ~ok
