"""Evaluation, always with ``train=False``: the global model and each client's own model.

Which global model exists is the policy module's answer (``policy.global_variables``): fedavg
and silobn have one, fedbn has none (BN layers are personal) unless the model has no BN layer.
Per-client evaluation (each client's local leaves on its own test data) is reported for every
policy. Personalized models (``docs/personalization.md``): a client's own local head or body
(FedPer, FedRep, LG-FedAvg) is part of its local leaves; Ditto's whole personal model is
evaluated by default (``personal=False``: the client's copy of the global model). Clients
without personal parts of their own (never trained) can be evaluated on the fallback model
(``fallback=``): the global model where the policy has one, else the global leaves plus the
clients' local leaves averaged by training size (an averaged head for FedPer and FedRep).
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_bn import policy
from fedjax_bn.adapt import adapt_variables
from fedjax_bn.algorithms.base import (
    Algorithm,
    FedState,
    client_variables,
    model_parts,
    personal_variables,
    task_of,
)
from fedjax_bn.client import batch_sums
from fedjax_bn.data import FederatedData, pooled_test
from fedjax_bn.task import Task, as_task
from fedjax_bn.tree import Variables

Array = jax.Array


class Metrics(NamedTuple):
    """Mean loss and accuracy over ``count`` examples (NaN when ``count`` is zero, or for
    ``accuracy`` when the task has none), and every task metric's mean (``metrics``)."""

    loss: float
    accuracy: float
    count: int
    metrics: dict[str, float] = {}


class EvalMetrics(NamedTuple):
    """Per-client test metrics (arrays [C]) and their example-count-weighted means."""

    loss: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    mean_accuracy: float
    weighted_accuracy: float
    ids: np.ndarray | None = None  # the client ids evaluated, in the order of the arrays
    metrics: dict[str, np.ndarray] = {}  # every task metric per client ([C] each)


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(
    task: Task, variables: Variables, x_B: Any, y_B: Any, mask_B: Array
) -> tuple[Array, dict[str, Array]]:
    return batch_sums(task, task.outputs(variables, x_B), y_B, mask_B)


def _padded(tree: Any, start: int, size: int) -> Any:
    """Examples ``[start, start + size)`` of a host pytree, zero-padded to ``size`` rows."""

    def cut(a: np.ndarray) -> np.ndarray:
        part = np.asarray(a)[start : start + size]
        pad = np.zeros((size - len(part), *part.shape[1:]), part.dtype)
        return np.concatenate([part, pad])

    return jax.tree.map(cut, tree)


def evaluate_model(
    model: Any, variables: Variables, x_N: Any, y_N: Any, batch_size: int = 256
) -> Metrics:
    """Loss and metrics of ``variables`` on (x, y) in eval mode (``train=False``); batches
    padded to one shape, padding masked out. ``model``: a Linen/NNX model or a Task."""
    task = as_task(model)
    n = len(jax.tree.leaves(y_N)[0])
    loss_sum, sums = 0.0, dict.fromkeys(task.metrics, 0.0)
    for start in range(0, n, batch_size):
        mask_B = np.arange(batch_size) < min(batch_size, n - start)
        x_B, y_B = _padded(x_N, start, batch_size), _padded(y_N, start, batch_size)
        loss, metric_sums = _eval_batch(task, variables, x_B, y_B, mask_B)
        loss_sum += float(loss)
        sums = {k: sums[k] + float(v) for k, v in metric_sums.items()}
    if n == 0:
        return Metrics(float("nan"), float("nan"), 0, dict.fromkeys(task.metrics, float("nan")))
    means = {k: v / n for k, v in sums.items()}
    return Metrics(loss_sum / n, means.get("accuracy", float("nan")), n, means)


def global_variables(alg: Algorithm, state: FedState, train_sizes: Array) -> Variables | None:
    """The global model under ``alg``'s policy, or None where the policy has none (fedbn)."""
    return policy.global_variables(alg.policy, *model_parts(state), train_sizes)


def client_model(alg: Algorithm, state: FedState, c: int, personal: bool = True) -> Variables:
    """Client ``c``'s personal model: global shared/pooled leaves plus its own local leaves,
    or its whole personal model where the algorithm keeps one (Ditto) and ``personal``."""
    return personal_variables(state, c) if personal else client_variables(state, c)


def fallback_model(alg: Algorithm, state: FedState, train_sizes: Array) -> Variables:
    """The model for a client without trained personal parts (``policy.fallback_variables``):
    the global model, else global leaves plus the local leaves averaged by ``train_sizes``."""
    return policy.fallback_variables(alg.policy, *model_parts(state), train_sizes)


def evaluate_global(
    alg: Algorithm, state: FedState, data: FederatedData, batch_size: int = 256
) -> Metrics | None:
    """The global model on the pooled test set of all clients (None under fedbn)."""
    variables = global_variables(alg, state, data.train.n)
    if variables is None:
        return None
    x, y = pooled_test(data)
    return evaluate_model(task_of(alg), variables, x, y, batch_size)


def evaluate_clients(
    alg: Algorithm,
    state: FedState,
    data: FederatedData,
    batch_size: int = 256,
    *,
    clients: Sequence[int] | None = None,
    adapt: Collection[int] = (),
    personal: bool = True,
    fallback: Collection[int] = (),
) -> EvalMetrics:
    """Each client's model (its own local BN leaves) on its own test data.

    ``clients``: evaluate only these client ids (a sample, for populations too large to
    evaluate every round; default all). Clients in ``adapt`` first get their BN running
    statistics recomputed on their own training images (AdaBN, :func:`fedjax_bn.adapt_bn`; no
    labels used): for clients that never trained, whose local BN is still the initial one.
    ``personal=False``: Ditto's clients on their copy of the global model instead of their
    personal one (no effect elsewhere). Clients in ``fallback`` are evaluated on
    :func:`fallback_model` (averaged local parts) instead of their own local leaves.
    One client's model at a time is built, so memory does not grow with the population.
    """
    ids = range(len(np.asarray(data.test.n))) if clients is None else clients
    ids = np.asarray(ids, dtype=np.int64)
    n_C = np.asarray(data.test.n)
    if ids.size == 0:
        raise ValueError("evaluate_clients needs at least one client id, got none.")
    if ids.min() < 0 or ids.max() >= len(n_C):
        raise ValueError(f"client ids must lie in [0, {len(n_C)}), got {ids.tolist()}.")

    per = []
    backup = fallback_model(alg, state, data.train.n) if len(fallback) else None
    for c in ids.tolist():
        variables = backup if c in fallback else client_model(alg, state, c, personal)
        if c in adapt:
            x_train = data.train.client(c)[0]
            variables = adapt_variables(task_of(alg), variables, x_train, batch_size=batch_size)
        x, y = data.test.client(c)
        per.append(evaluate_model(task_of(alg), variables, x, y, batch_size))
    loss, acc, count = (np.array([getattr(m, f) for m in per]) for f in Metrics._fields[:3])
    metrics = {k: np.array([m.metrics[k] for m in per]) for k in per[0].metrics}
    has = count > 0
    weighted = float(np.sum(acc[has] * count[has]) / max(np.sum(count), 1))
    mean = float(np.mean(acc[has])) if has.any() else float("nan")
    return EvalMetrics(loss, acc, count, mean, weighted, ids, metrics)
