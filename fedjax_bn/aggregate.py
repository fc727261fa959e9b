"""Server-side aggregation: weighted means over a leading client axis, pooled BN statistics.

Integer leaves (a BN ``num_batches_tracked`` counter, a step count) are never averaged: they keep
the server's value and dtype. Float leaves are averaged in float32 and cast back to their own dtype,
so bfloat16, float32 and int32 leaves live in one tree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_bn.tree import flatten, is_integer_leaf, unflatten

Array = jax.Array


def normalized_weights(weights_C: Array) -> Array:
    """Weights scaled to sum to one; a ValueError when they are concrete and sum to zero."""
    weights_C = jnp.asarray(weights_C, jnp.float32)
    if weights_C.ndim != 1:
        raise ValueError(f"Client weights must be 1-D [num_clients], got shape {weights_C.shape}.")
    if not isinstance(weights_C, jax.core.Tracer):
        if bool(jnp.any(weights_C < 0)):
            raise ValueError("Client weights must be non-negative.")
        if float(jnp.sum(weights_C)) <= 0.0:
            raise ValueError(
                "Total client weight is zero: at least one client must report examples "
                "(check that every sampled client has training data)."
            )
    return weights_C / jnp.sum(weights_C)


def _mean_leaf(stacked_CX: Array, w_C: Array, server_X: Any) -> Array:
    if is_integer_leaf(stacked_CX):
        return server_X
    mean = jnp.tensordot(w_C, stacked_CX.astype(jnp.float32), axes=1)
    return mean.astype(stacked_CX.dtype)


def weighted_mean(stacked: Any, weights_C: Array, server: Any) -> Any:
    """Weighted mean of ``stacked`` (every leaf has a leading client axis) over clients.

    ``server`` has the same structure without the client axis; its integer leaves are returned
    unchanged (value and dtype), its float leaves are replaced by the mean.
    """
    w_C = normalized_weights(weights_C)
    return jax.tree.map(lambda s, v: _mean_leaf(s, w_C, v), stacked, server)


def pooled_moments(mean_CX: Array, var_CX: Array, w_C: Array) -> tuple[Array, Array]:
    """Mean and variance of the union of clients' data from per-client moments.

    ``mean = sum_k w_k mean_k``; ``var = sum_k w_k (var_k + mean_k^2) - mean^2``. The naive mean of
    variances misses the spread of client means, exactly what non-IID data has.
    """
    mean = jnp.tensordot(w_C, mean_CX, axes=1)
    second = jnp.tensordot(w_C, var_CX + jnp.square(mean_CX), axes=1)
    return mean, jnp.maximum(second - jnp.square(mean), 0.0)


def pool_batch_stats(stacked: Any, weights_C: Array, server: Any) -> Any:
    """Pool stacked BN running statistics (``{..., layer: {'mean', 'var'}}``) into one set.

    Every module holding a ``mean`` and a ``var`` is pooled with :func:`pooled_moments`; other
    float leaves get the weighted mean and integer leaves keep the server's value.
    """
    w_C = normalized_weights(weights_C)
    flat, flat_server = flatten(stacked), flatten(server)
    out = {p: _mean_leaf(v, w_C, flat_server[p]) for p, v in flat.items()}
    for path in flat:
        if path[-1] != "mean" or path[:-1] + ("var",) not in flat:
            continue
        var_path = path[:-1] + ("var",)
        mean_CX, var_CX = flat[path], flat[var_path]
        mean, var = pooled_moments(mean_CX.astype(jnp.float32), var_CX.astype(jnp.float32), w_C)
        out[path], out[var_path] = mean.astype(mean_CX.dtype), var.astype(var_CX.dtype)
    return unflatten(out)
