"""Server-side aggregation math: weighted means over a leading client axis, pooled moments.

Integer leaves (a BN ``num_batches_tracked`` counter, a step count) are never averaged: they keep
the server's value and dtype. Float leaves are averaged in float32 and cast back to their own dtype,
so bfloat16, float32 and int32 leaves live in one tree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_bn.tree import is_integer_leaf

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


def _path(keys: Any) -> str:
    return jax.tree_util.keystr(keys, simple=True, separator="/")


def check_stacked(stacked: Any, server: Any, num_clients: int) -> None:
    """Raise a ValueError naming the first leaf where ``stacked`` is not ``server`` stacked
    ``num_clients`` times (same tree, every leaf ``[num_clients, *server_leaf.shape]``)."""
    flat_c, def_c = jax.tree_util.tree_flatten_with_path(stacked)
    flat_s, def_s = jax.tree_util.tree_flatten_with_path(server)
    if def_c != def_s:
        have, want = {_path(p) for p, _ in flat_c}, {_path(p) for p, _ in flat_s}
        raise ValueError(
            f"Client trees do not match the server tree: missing {sorted(want - have)}, "
            f"unexpected {sorted(have - want)} (client structure {def_c}, server {def_s})."
        )
    for (path, leaf_c), (_, leaf_s) in zip(flat_c, flat_s, strict=True):
        want_shape = (num_clients, *jnp.shape(leaf_s))
        if jnp.shape(leaf_c) != want_shape:
            raise ValueError(
                f"{_path(path)}: stacked client leaf has shape {jnp.shape(leaf_c)}, expected "
                f"{want_shape} ([num_clients, *server shape])."
            )


def mean_leaf(stacked_CX: Array, w_C: Array, server_X: Any) -> Array:
    """Weighted mean of one stacked float leaf (``w_C`` normalized); integers keep ``server_X``."""
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
    check_stacked(stacked, server, w_C.shape[0])
    return jax.tree.map(lambda s, v: mean_leaf(s, w_C, v), stacked, server)


def pooled_moments(mean_CX: Array, var_CX: Array, w_C: Array) -> tuple[Array, Array]:
    """Mean and variance of the union of clients' data from per-client moments.

    ``mean = sum_k w_k mean_k``; ``var = sum_k w_k (var_k + mean_k^2) - mean^2``. The naive mean of
    variances misses the spread of client means, exactly what non-IID data has. ``w_C`` are
    normalized here, so example counts can be passed directly.
    """
    w_C = normalized_weights(w_C)
    mean = jnp.tensordot(w_C, mean_CX, axes=1)
    second = jnp.tensordot(w_C, var_CX + jnp.square(mean_CX), axes=1)
    return mean, jnp.maximum(second - jnp.square(mean), 0.0)


def normalized_mean(stacked: Any, weights_C: Array, steps_C: Array, server: Any) -> Any:
    """FedNova's normalized average (Wang et al. 2020, vanilla SGD form) of ``stacked``.

    With ``p`` the normalized weights, ``tau_c`` client ``c``'s local steps and
    ``d_c = (x - y_c) / tau_c`` its update per step, the result is
    ``x - tau_eff * sum_c p_c d_c``, ``tau_eff = sum_c p_c tau_c``: each client's update is
    rescaled by ``tau_eff / tau_c``, so a client doing more steps no longer counts for more.
    Equal steps give :func:`weighted_mean` back. A client with ``tau_c = 0`` contributes
    nothing (no division by zero). Integer leaves keep the server's value and dtype.
    """
    p_C = normalized_weights(weights_C)
    check_stacked(stacked, server, p_C.shape[0])
    tau_C = jnp.asarray(steps_C, jnp.float32)
    if tau_C.shape != p_C.shape:
        raise ValueError(f"steps_C must have shape {p_C.shape}, got {tau_C.shape}.")
    tau_eff = jnp.sum(p_C * tau_C)
    scale_C = jnp.where(tau_C > 0, p_C * tau_eff / jnp.where(tau_C > 0, tau_C, 1.0), 0.0)

    def leaf(stacked_CX: Array, server_X: Any) -> Array:
        if is_integer_leaf(stacked_CX):
            return server_X
        x = jnp.asarray(server_X, jnp.float32)
        step = jnp.tensordot(scale_C, stacked_CX.astype(jnp.float32) - x, axes=1)
        return (x + step).astype(stacked_CX.dtype)

    return jax.tree.map(leaf, stacked, server)
