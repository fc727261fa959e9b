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

The statistics are read at each BatchNorm's *input* (``bn_moments.py``), not recovered from
the running-statistics update as ``monitor.probe_batch_stats`` does: exact whatever the
layers' momentum.

:func:`fedavg_batch_stats_only` trains as PyTorch's ``track_running_stats=False`` would: BN
normalizes with batch statistics and no running averages are kept or sent, so the server's
statistics stay at their initial values until :func:`recalibrate_bn` computes them; evaluate it
with :func:`evaluate_recalibrated`, never with the stored statistics alone. It lives in
``algorithms/batch_stats_only.py`` and is re-exported here.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_bn import policy as policy_lib
from fedjax_bn.algorithms.base import Algorithm, FedState, model_parts, task_of
from fedjax_bn.algorithms.batch_stats_only import fedavg_batch_stats_only  # noqa: F401
from fedjax_bn.bn_moments import LayerMoments, batch_moments, pool, with_moments
from fedjax_bn.data import ClientArrays, FederatedData
from fedjax_bn.evaluate import Metrics, evaluate_global
from fedjax_bn.tree import Variables

Array = jax.Array


def client_moments(
    model: Any, variables: Variables, train: ClientArrays, c: int, batch_size: int
) -> LayerMoments | None:
    """What client ``c`` sends: per BN layer, its moments over all its real training examples
    (batch moments pooled by counts); None for a client with no examples."""
    n = int(jax.device_get(train.n[c]))
    batches = [
        batch_moments(model, variables, train.x, train.n, jnp.array([c, s]), batch_size)
        for s in range(0, n, batch_size)
    ]
    if not batches:
        return None
    return {p: pool([b[p] for b in batches]) for p in batches[0]}


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
