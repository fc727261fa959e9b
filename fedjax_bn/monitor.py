"""BatchNorm divergence monitor: how far apart the clients' BN layers are, layer by layer.

Every function is pure jnp over *stacked* trees (every leaf has a leading client axis ``C``) and
jits. Two quantities:

- **statistics divergence** (:func:`bn_stats_divergence`): each client's BN statistics of a
  layer are read as per-channel Gaussians ``N(mean, var)``; the divergence is the squared
  2-Wasserstein distance between two clients' Gaussians, ``(m1 - m2)^2 + (s1 - s2)^2`` with
  ``s = sqrt(var)``, averaged over channels and over all client pairs. It is zero for identical
  clients and grows with the feature shift between them.
- **affine divergence** (:func:`bn_affine_divergence`): the squared Euclidean distance between
  two clients' BN ``scale`` and ``bias``, ``(g1 - g2)^2 + (b1 - b2)^2`` per channel, averaged the
  same way. Only meaningful where BN parameters stay with each client (``fedbn``).

Which statistics go in is the caller's choice, and worth naming in results: the clients'
*running* statistics (the local ``batch_stats`` of ``model_parts(state)`` under ``fedbn`` and
``silobn``), or the *probe* statistics of :func:`clients_probe_stats` (the batch statistics at every
BN layer of each client's model on a
fixed batch of its own data), which exist for every policy, including ``fedavg`` whose server
keeps only pooled statistics.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_bn.algorithms.base import Algorithm, FedState, model_parts, task_of
from fedjax_bn.data import ClientArrays
from fedjax_bn.policy import bn_module_paths, bn_moment_paths, merge
from fedjax_bn.task import as_task
from fedjax_bn.tree import Variables, flatten, is_integer_leaf

Array = jax.Array


def mean_pairwise_sq_diff(x_CX: Array) -> Array:
    """``mean_{i<j} (x_i - x_j)^2`` over client pairs, elementwise over the trailing axes.

    Uses ``sum_{i<j} (x_i - x_j)^2 = C * sum_i (x_i - xbar)^2``, so it costs O(C), not O(C^2).
    Zero when there is a single client.
    """
    x_CX = jnp.asarray(x_CX, jnp.float32)
    c = x_CX.shape[0]
    if c < 2:
        return jnp.zeros(x_CX.shape[1:], jnp.float32)
    centered = x_CX - jnp.mean(x_CX, axis=0)
    return 2.0 * jnp.sum(jnp.square(centered), axis=0) / (c - 1)


def gaussian_w2_divergence(mean_CX: Array, var_CX: Array) -> Array:
    """Mean over client pairs and channels of the squared W2 distance between N(mean, var)s."""
    std_CX = jnp.sqrt(jnp.maximum(jnp.asarray(var_CX, jnp.float32), 0.0))
    return jnp.mean(mean_pairwise_sq_diff(mean_CX) + mean_pairwise_sq_diff(std_CX))


def _layer_name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def bn_stats_divergence(batch_stats_C: Variables) -> dict[str, Array]:
    """Per BN layer (``'Block_0/BatchNorm_0'``): :func:`gaussian_w2_divergence` of its stats.

    ``batch_stats_C`` is a stacked ``batch_stats`` collection; every module holding a ``mean``
    and a ``var`` leaf is a BN layer, other leaves (counters) are ignored.
    """
    flat = flatten(batch_stats_C)
    return {
        _layer_name(mean[:-1]): gaussian_w2_divergence(flat[mean], flat[var])
        for mean, var in bn_moment_paths(batch_stats_C)
    }


def bn_affine_divergence(variables_C: Variables) -> dict[str, Array]:
    """Per BN layer: mean over client pairs and channels of ``(g1-g2)^2 + (b1-b2)^2``.

    ``variables_C`` holds stacked ``params`` and ``batch_stats`` (e.g. the local part of
    ``model_parts(state)`` under ``fedbn``); BN layers are found structurally (their module
    paths hold ``batch_stats``), so
    their ``params`` leaves are picked whatever the layers are called. Layers whose affine
    parameters are not in ``variables_C`` (they are shared) are left out.
    """
    bn_paths = bn_module_paths(variables_C)
    per_layer: dict[tuple[str, ...], Array] = {}
    for path, leaf in flatten(variables_C.get("params", {})).items():
        if path[:-1] in bn_paths:
            term = jnp.mean(mean_pairwise_sq_diff(leaf))
            per_layer[path[:-1]] = per_layer.get(path[:-1], 0.0) + term
    return {_layer_name(p): v for p, v in sorted(per_layer.items())}


def mean_over_layers(per_layer: dict[str, Array]) -> Array:
    """Unweighted mean over layers (NaN when there is none)."""
    if not per_layer:
        return jnp.array(jnp.nan, jnp.float32)
    return jnp.mean(jnp.stack(list(per_layer.values())))


def probe_batch_stats(model: Any, variables: Variables, x_B: Array, mask_B: Array) -> Any:
    """The batch statistics (mean, biased var) every BN layer computes on ``x_B`` in train mode.

    Read out of the model's own running-statistics update, whatever each layer's momentum ``m``:
    with running stats zeroed, ``out0 = (1 - m) * batch``; with them set to one,
    ``out1 = m + (1 - m) * batch``; hence ``batch = out0 / (1 - (out1 - out0))``. Integer leaves
    (counters) are returned as the first pass left them.
    """
    stats = variables.get("batch_stats")
    if not stats:  # a model without BatchNorm has no statistics to probe
        return {}

    def run(fill: float) -> Any:
        filled = jax.tree.map(lambda s: jnp.full_like(s, fill), stats)
        _, updates = as_task(model).apply(
            {**variables, "batch_stats": filled},
            x_B,
            train=True,
            mask=mask_B,
            rng=jax.random.key(0),
        )
        return updates["batch_stats"]

    out0, out1 = run(0.0), run(1.0)

    def recover(a: Array, b: Array) -> Array:
        if is_integer_leaf(a):
            return a
        keep = 1.0 - (b - a)  # = 1 - momentum
        return a / jnp.where(keep > 0, keep, 1.0)

    return jax.tree.map(recover, out0, out1)


def probe_batches(train: ClientArrays, size: int) -> tuple[Array, Array]:
    """A fixed probe batch per client: its first ``size`` train examples, masked past its size.

    Returns ``(x [C, size, ...], mask [C, size])``; clients with fewer examples are masked.
    """
    if size < 1:
        raise ValueError(f"probe size must be >= 1, got {size}.")
    positions = jnp.arange(size)
    idx = jnp.minimum(positions, train.n_max - 1)
    mask_CB = positions[None, :] < jnp.asarray(train.n)[:, None]  # n[c] <= N_max
    return jax.tree.map(lambda a: jnp.take(a, idx, axis=1), train.x), mask_CB


def clients_probe_stats(alg: Algorithm, state: FedState, x_CB: Array, mask_CB: Array) -> Any:
    """Stacked BN batch statistics of every client's model on its own probe batch (train mode).

    Client ``c``'s model is the global model plus its local leaves. This measures how the
    clients' *features* differ at each BN layer; it needs no per-client running statistics, so
    it works for ``fedavg`` too.
    """
    parts = model_parts(state)

    def one(local: Variables, x_B: Array, mask_B: Array) -> Any:
        variables = merge(parts.shared, parts.pooled, local)
        return probe_batch_stats(task_of(alg), variables, x_B, mask_B)

    return jax.vmap(one)(parts.local, x_CB, mask_CB)


def local_batch_stats(state: FedState) -> Variables | None:
    """The clients' stacked running statistics when the policy keeps them local, else None."""
    local = model_parts(state).local
    return local.get("batch_stats") or None


def stats_source(state: FedState, client_stats: Variables | None = None) -> str:
    """Which statistics :func:`round_divergences` reads as the clients' BN statistics.

    ``'round'``: the clients' post-round running statistics returned by the round (before
    pooling); ``'local'``: their running statistics kept per client (fedbn, silobn);
    ``'probe'``: :func:`clients_probe_stats` (fedavg keeps only pooled statistics).
    """
    if client_stats:
        return "round"
    return "local" if local_batch_stats(state) else "probe"


def round_divergences(
    alg: Algorithm,
    state: FedState,
    x_CB: Array,
    mask_CB: Array,
    client_stats: Variables | None = None,
) -> dict[str, dict[str, Array]]:
    """All divergences of one round, per BN layer (jit it; ``alg`` bound with functools.partial).

    - ``'bn'``: statistics divergence of the clients' BN statistics, read from the source that
      :func:`stats_source` names;
    - ``'probe'``: statistics divergence of :func:`clients_probe_stats` (comparable across
      policies);
    - ``'affine'``: :func:`bn_affine_divergence` of the clients' local BN scale/bias (empty
      unless the policy keeps them local, i.e. fedbn).
    """
    probe = bn_stats_divergence(clients_probe_stats(alg, state, x_CB, mask_CB))
    running = client_stats or local_batch_stats(state)
    local = model_parts(state).local
    return {
        "bn": bn_stats_divergence(running) if running else probe,
        "probe": probe,
        "affine": bn_affine_divergence(local) if local else {},
    }
