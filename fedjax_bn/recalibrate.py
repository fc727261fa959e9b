"""Exact federated BN recalibration ("static BN", HeteroFL, Diao et al., ICLR 2021).

:func:`recalibrate_bn` replaces the global model's BN statistics by the statistics of the union
of the clients' training data, computed by forward passes of the current global model: every
client sends, per BN layer, its count, mean and (biased) variance over all its real examples,
and the server pools them exactly (:func:`~fedjax_bn.aggregate.pooled_moments`, the formula
fedavg's ``bn_stats="pooled"`` uses).

What "the statistics of the union" means for deeper layers. Layer 2's input depends on how
layer 1 normalized. We follow HeteroFL's static BN: forward passes in *train mode* (every BN
layer normalizes with the statistics of the batch at hand) over the data, and cumulative
statistics of each layer's inputs (PyTorch's ``momentum=None``), made exact: batch moments are
combined by counts, not averaged as batch variances. So the first BN layer's statistics are
exactly the mean and biased variance of its inputs over every real training example; deeper
layers' are exact for inputs produced by train-mode (batch-normalized) upstream layers, which
depend on the batches (consecutive real examples of each client, ``batch_size`` at a time, no
shuffling, so the result is deterministic). The alternative, calibrating layer by layer with
the upstream layers already in eval mode on the new statistics, needs per-layer BN modes that
the models' single ``train`` flag does not give, and one pass per layer.

The statistics are read at each BatchNorm's *input* by a flax method interceptor (mask-aware,
in float32, two-pass per batch), not recovered from the running-statistics update as
``monitor.probe_batch_stats`` does: exact whatever the layers' momentum.

:func:`fedavg_batch_stats_only` trains as PyTorch's ``track_running_stats=False`` would: BN
normalizes with batch statistics and no running averages are kept or sent, so the server's
statistics stay at their initial values until :func:`recalibrate_bn` computes them; evaluate it
with :func:`evaluate_recalibrated`, never with the stored statistics alone.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_bn import policy as policy_lib
from fedjax_bn.aggregate import pooled_moments
from fedjax_bn.algorithms.base import Algorithm, FedState, model_parts, task_of
from fedjax_bn.algorithms.fedavg import ClientState, Message, ServerState, make_algorithm
from fedjax_bn.client import ClientMetrics
from fedjax_bn.data import ClientArrays, FederatedData
from fedjax_bn.evaluate import Metrics, evaluate_global
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
def _batch_moments(
    model: Any, variables: Variables, x_CN: Any, n_C: Array, cs: Array, batch_size: int
) -> LayerMoments:
    """:func:`bn_input_moments` of client ``c``'s examples ``[s, s + batch_size)``."""
    c, start = cs[0], cs[1]
    idx_B = start + jnp.arange(batch_size)
    mask_B = idx_B < n_C[c]
    x_B = jax.tree.map(lambda a: jnp.take(a[c], jnp.minimum(idx_B, a.shape[1] - 1), axis=0), x_CN)
    return bn_input_moments(model, variables, x_B, mask_B)


def client_moments(
    model: Any, variables: Variables, train: ClientArrays, c: int, batch_size: int
) -> LayerMoments | None:
    """What client ``c`` sends: per BN layer, its moments over all its real training examples
    (batch moments pooled by counts); None for a client with no examples."""
    n = int(jax.device_get(train.n[c]))
    batches = [
        _batch_moments(model, variables, train.x, train.n, jnp.array([c, s]), batch_size)
        for s in range(0, n, batch_size)
    ]
    if not batches:
        return None
    return {p: pool([b[p] for b in batches]) for p in batches[0]}


def with_moments(batch_stats: Variables, moments: LayerMoments) -> Variables:
    """``batch_stats`` with each measured layer's ``mean``/``var`` replaced (dtypes kept)."""
    flat = flatten(batch_stats)
    for mean_path, var_path in policy_lib.bn_moment_paths(batch_stats):
        m = moments.get(mean_path[:-1])
        if m is not None:
            flat[mean_path] = m.mean.astype(flat[mean_path].dtype)
            flat[var_path] = m.var.astype(flat[var_path].dtype)
    return unflatten(flat)


def recalibrate_bn(
    alg: Algorithm, state: FedState, data: FederatedData | ClientArrays, *, batch_size: int = 256
) -> FedState:
    """``state`` with the global BN statistics (``state.server.pooled['batch_stats']``) set to
    the exact statistics of the union of the clients' training data (module docstring).

    Needs a global model holding pooled statistics (the fedavg policy: FedAvg, FedProx, the
    server optimizers, SCAFFOLD, FixBN, :func:`fedavg_batch_stats_only`). A model without BN
    is returned unchanged. Integer leaves (counters) keep their value.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    train = data.train if isinstance(data, FederatedData) else data
    parts = model_parts(state)
    if not policy_lib.has_batch_norm(policy_lib.merge(parts.pooled, parts.local)):
        return state
    if alg.policy != "fedavg" or "batch_stats" not in parts.pooled:
        raise ValueError(
            f"recalibrate_bn needs global BN statistics on the server (policy 'fedavg'); "
            f"{alg.name!r} has policy {alg.policy!r}, whose statistics are per client."
        )
    variables = policy_lib.global_variables(alg.policy, *parts, train.n)
    sent = [
        client_moments(task_of(alg), variables, train, c, batch_size) for c in range(len(train.n))
    ]
    sent = [m for m in sent if m is not None]
    if not sent:
        raise ValueError("recalibrate_bn: no client has training examples.")
    pooled = {p: pool([m[p] for m in sent]) for p in sent[0]}
    stats = with_moments(parts.pooled["batch_stats"], pooled)
    server = state.server._replace(pooled={**parts.pooled, "batch_stats": stats})
    return state._replace(server=server)


def evaluate_recalibrated(
    alg: Algorithm,
    state: FedState,
    data: FederatedData,
    *,
    batch_size: int = 256,
    recalibrate_batch_size: int = 256,
) -> Metrics | None:
    """The global model on the pooled test set after :func:`recalibrate_bn` on the train set.

    For a runner option "recalibrate before every evaluation": the training state itself is
    left as it was. Policies whose statistics are per client (fedbn, silobn) have no global
    statistics to recalibrate and are evaluated as :func:`~fedjax_bn.evaluate_global` does
    (None under fedbn).
    """
    if alg.policy != "fedavg":
        return evaluate_global(alg, state, data, batch_size)
    new = recalibrate_bn(alg, state, data, batch_size=recalibrate_batch_size)
    return evaluate_global(alg, new, data, batch_size)


def fedavg_batch_stats_only(
    model: Any, client_tx: optax.GradientTransformation, **kw: Any
) -> Algorithm:
    """FedAvg with BN on batch statistics only (``track_running_stats=False`` style).

    Clients train in train mode as FedAvg does, but send no BN statistics and the server keeps
    none: ``pooled`` stays at the model's initial statistics, meaningful only after
    :func:`recalibrate_bn`. Its parameters train exactly as FedAvg's (the running statistics
    never enter a train-mode forward pass). Keywords: ``make_algorithm``'s, except ``policy``
    and ``bn_train``, which this factory sets.
    """
    for owned in ("policy", "bn_train"):
        if owned in kw:
            raise TypeError(f"fedavg_batch_stats_only sets {owned!r} itself; it cannot be passed.")
    name = kw.pop("name", "fedavg_batch_stats_only")
    base = make_algorithm(model, client_tx, policy="fedavg", name=name, **kw)

    def client_final(carry: Any) -> tuple[Message, ClientState, ClientMetrics]:
        message, client, metrics = base.client_final(carry)
        return message._replace(pooled={}), client, metrics

    def server_update(server: ServerState, messages: Message, weights_C: Array) -> ServerState:
        new = base.server_update(server._replace(pooled={}), messages, weights_C)
        return new._replace(pooled=server.pooled)

    return base._replace(client_final=client_final, server_update=server_update)
