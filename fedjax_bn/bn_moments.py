"""BatchNorm input moments: per layer, per channel count, mean and biased variance, exact.

What recalibration (``recalibrate.py``) and AdaBN (``adapt.py``) both measure: every BN layer's
statistics at its *input*, read by the task's train-mode forward pass (a flax method
interceptor for Linen, a hook on the per-call copy for NNX; mask-aware, in float32, two-pass
per batch), and pooled exactly over batches and clients by counts
(:func:`~fedjax_bn.aggregate.pooled_moments`), not averaged as batch variances.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bn import policy as policy_lib
from fedjax_bn.aggregate import pooled_moments
from fedjax_bn.task import as_task
from fedjax_bn.tree import Path, Variables, flatten, unflatten

Array = jax.Array


class Moments(NamedTuple):
    """One BN layer's input statistics over ``count`` values per channel (biased variance)."""

    count: Array  # float32 scalar
    mean: Array  # [channels]
    var: Array  # [channels]


LayerMoments = dict[Path, Moments]  # keyed by the BN module's path


def masked_moments(x: Array, mask: Array | None, axis: Any) -> Moments:
    """Per-channel count, mean and biased variance of ``x`` over its real entries.

    ``axis``: the BN layer's feature axes (flax's ``BatchNorm.axis``); ``mask`` broadcasts to
    ``x`` (None: every entry is real).
    """
    x = x.astype(jnp.float32)
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    features = {a % x.ndim for a in axes}
    reduce = tuple(i for i in range(x.ndim) if i not in features)
    m = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    count_X = jnp.sum(m, axis=reduce)
    safe = jnp.maximum(count_X, 1.0)
    mean = jnp.sum(x * m, axis=reduce) / safe
    centered = (x - jnp.expand_dims(mean, reduce)) * m
    var = jnp.sum(jnp.square(centered), axis=reduce) / safe
    return Moments(jnp.max(count_X), mean, var)


def pool(moments: list[Moments]) -> Moments:
    """Moments of the union of the parts, exactly (:func:`pooled_moments`, weights = counts)."""
    counts = jnp.stack([m.count for m in moments])
    mean, var = pooled_moments(
        jnp.stack([m.mean for m in moments]), jnp.stack([m.var for m in moments]), counts
    )
    return Moments(jnp.sum(counts), mean, var)


def bn_input_moments(
    model: Any, variables: Variables, x_B: Any, mask_B: Array | None
) -> LayerMoments:
    """Every BN layer's input moments on one batch, in a train-mode forward pass (jittable;
    ``model``: a Linen or NNX model or a :class:`~fedjax_bn.task.Task`).

    A layer called several times in one pass gets the moments of all its calls' inputs.
    """
    seen: dict[Path, list[Moments]] = {}

    def record(path: Path, x: Array, mask: Array | None, axis: Any) -> None:
        seen.setdefault(path, []).append(masked_moments(x, mask, axis))

    as_task(model).adapter.record_bn_inputs(record, variables, x_B, mask_B)
    return {p: ms[0] if len(ms) == 1 else pool(ms) for p, ms in seen.items()}


@functools.partial(jax.jit, static_argnums=(0, 5))
def batch_moments(
    model: Any, variables: Variables, x_CN: Any, n_C: Array, cs: Array, batch_size: int
) -> LayerMoments:
    """:func:`bn_input_moments` of client ``c``'s examples ``[s, s + batch_size)``, masked past
    its ``n_C[c]`` (``cs = [c, s]``, data: one compiled program per shape). One client's
    examples ``x_N`` are ``x_CN = x_N[None]`` with ``c = 0``."""
    c, start = cs[0], cs[1]
    idx_B = start + jnp.arange(batch_size)
    mask_B = idx_B < n_C[c]
    x_B = jax.tree.map(lambda a: jnp.take(a[c], jnp.minimum(idx_B, a.shape[1] - 1), axis=0), x_CN)
    return bn_input_moments(model, variables, x_B, mask_B)


def with_moments(batch_stats: Variables, moments: LayerMoments) -> Variables:
    """``batch_stats`` with each measured layer's ``mean``/``var`` replaced (dtypes kept)."""
    flat = flatten(batch_stats)
    for mean_path, var_path in policy_lib.bn_moment_paths(batch_stats):
        m = moments.get(mean_path[:-1])
        if m is not None:
            flat[mean_path] = m.mean.astype(flat[mean_path].dtype)
            flat[var_path] = m.var.astype(flat[var_path].dtype)
    return unflatten(flat)
