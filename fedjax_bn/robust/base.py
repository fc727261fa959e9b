"""The aggregator protocol: a rule that folds the clients' stacked updates into one update.

An :class:`Aggregator` is a NamedTuple (optax's shape) whose ``combine`` maps the clients'
float updates ``delta_c = client_c - server`` (by leaf path, each ``[C, ...]`` float32) and their
weights ``w_C`` to one update. A slot of weight zero (a padding slot, a quarantined or an
unsampled client) takes no part, in every aggregator. :func:`aggregate` applies it to a stacked
variables tree: float leaves become ``server + combine(...)`` in their own dtype, integer
leaves keep the server's value and dtype. :func:`aggregate_batch_stats` does the same for BN
running statistics with the aggregator's ``stats`` rule and keeps variances non-negative.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bn.aggregate import check_stacked, normalized_weights
from fedjax_bn.policy import bn_moment_paths, float_leaves, with_leaves
from fedjax_bn.tree import Path, Variables, flatten, unflatten

Array = jax.Array
Deltas = dict[Path, Array]
Combine = Callable[[Deltas, Array], Deltas]


class Aggregator(NamedTuple):
    """A server aggregation rule (see the module docstring).

    ``min_clients``: the fewest cohort slots it is defined for (Krum: ``2f + 3``), checked
    when a round's stacked messages arrive. ``stats``: the rule for BN running statistics
    (None: ``combine`` itself, applied to the statistics as a vector of their own).
    """

    name: str
    combine: Combine
    min_clients: int = 1
    stats: Combine | None = None


def present(w_C: Array) -> Array:
    """``[C]`` bool: the slots that take part (weight > 0)."""
    return jnp.asarray(w_C, jnp.float32) > 0


def flat_clients(deltas: Deltas) -> Array:
    """``[C, D]``: every client's update as one vector (leaves in path order)."""
    return jnp.concatenate([d.reshape(d.shape[0], -1) for d in deltas.values()], axis=1)


def unflat_clients(vec_D: Array, deltas: Deltas) -> Deltas:
    """Inverse of :func:`flat_clients` for one vector ``[D]`` (shapes from ``deltas``)."""
    out, start = {}, 0
    for path, d in deltas.items():
        size = d[0].size
        out[path] = vec_D[start : start + size].reshape(d.shape[1:])
        start += size
    return out


def check_weights(weights_C: Array, num_clients: int, agg: Aggregator) -> Array:
    """Float32 weights ``[C]``, validated; a ValueError when the cohort is too small for ``agg``."""
    w_C = jnp.asarray(weights_C, jnp.float32)
    normalized_weights(w_C)  # shape, sign and zero-total checks
    if num_clients < agg.min_clients:
        raise ValueError(
            f"Aggregator {agg.name} needs at least {agg.min_clients} clients per round, got a "
            f"cohort of {num_clients}: sample more clients or choose a smaller f."
        )
    return w_C


def _fold(combine: Combine, stacked: Variables, w_C: Array, server: Variables) -> Variables:
    old, new = float_leaves(server), float_leaves(stacked)
    if not old:
        return server
    ok_C = present(w_C)

    def delta(p: Path) -> Array:  # absent slots zeroed: no NaN of theirs reaches a product
        d = new[p].astype(jnp.float32) - old[p].astype(jnp.float32)
        return jnp.where(ok_C.reshape((-1,) + (1,) * (d.ndim - 1)), d, 0.0)

    deltas = {p: delta(p) for p in old}
    step = combine(deltas, w_C)
    return with_leaves(server, {p: (old[p] + step[p]).astype(new[p].dtype) for p in old})


def aggregate(agg: Aggregator, stacked: Variables, weights_C: Array, server: Variables) -> Any:
    """``server`` moved by ``agg``'s combination of the clients' updates (float leaves only)."""
    w_C = check_weights(weights_C, len(jnp.asarray(weights_C)), agg)
    check_stacked(stacked, server, w_C.shape[0])
    return _fold(agg.combine, stacked, w_C, server)


def aggregate_batch_stats(
    agg: Aggregator, stacked: Variables, weights_C: Array, server: Variables
) -> Variables:
    """BN running statistics folded by ``agg.stats`` (or ``agg.combine``), variances >= 0."""
    w_C = check_weights(weights_C, len(jnp.asarray(weights_C)), agg)
    check_stacked(stacked, server, w_C.shape[0])
    out = flatten(_fold(agg.stats or agg.combine, stacked, w_C, server))
    for _, var_path in bn_moment_paths(stacked):
        out[var_path] = jnp.maximum(out[var_path], 0).astype(out[var_path].dtype)
    return unflatten(out)
