"""Evaluation, always with ``train=False``: the global model and each client's own model.

The global model exists where the policy has one: fedavg (shared params + pooled statistics) and
silobn (shared params + the clients' local statistics pooled by training size). Under fedbn the BN
layers are personal, so only per-client evaluation (each client's local BN leaves on its own test
data) is meaningful; it is reported for every policy.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from fedjax_bn.aggregate import pool_batch_stats
from fedjax_bn.algorithms import Algorithm, ServerState, take_client
from fedjax_bn.client import masked_cross_entropy
from fedjax_bn.data import FederatedData, pooled_test
from fedjax_bn.tree import Variables, merge

Array = jax.Array


class Metrics(NamedTuple):
    """Mean loss and accuracy over ``count`` examples (NaN when ``count`` is zero)."""

    loss: float
    accuracy: float
    count: int


class ClientMetrics(NamedTuple):
    """Per-client test metrics (arrays [C]) and their example-count-weighted means."""

    loss: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    mean_accuracy: float
    weighted_accuracy: float


@functools.partial(jax.jit, static_argnums=0)
def _eval_batch(
    model: nn.Module, variables: Variables, x_B: Array, y_B: Array, mask_B: Array
) -> tuple[Array, Array]:
    logits = model.apply(variables, x_B, train=False)
    return masked_cross_entropy(logits, y_B, mask_B)


def evaluate_model(
    model: nn.Module, variables: Variables, x_N: np.ndarray, y_N: np.ndarray, batch_size: int = 256
) -> Metrics:
    """Loss and accuracy of ``variables`` on (x, y) in eval mode; batches padded to one shape."""
    n = len(y_N)
    loss_sum, correct = 0.0, 0
    for start in range(0, n, batch_size):
        x_B, y_B = x_N[start : start + batch_size], y_N[start : start + batch_size]
        pad = batch_size - len(y_B)
        mask_B = np.arange(batch_size) < len(y_B)
        x_B = np.concatenate([x_B, np.zeros((pad, *x_B.shape[1:]), x_B.dtype)])
        y_B = np.concatenate([y_B, np.zeros(pad, y_B.dtype)])
        ce, ok = _eval_batch(model, variables, x_B, y_B, mask_B)
        loss_sum, correct = loss_sum + float(ce), correct + int(ok)
    if n == 0:
        return Metrics(float("nan"), float("nan"), 0)
    return Metrics(loss_sum / n, correct / n, n)


def global_variables(alg: Algorithm, state: ServerState, train_sizes: Array) -> Variables | None:
    """The global model under ``alg``'s policy, or None where the policy has none (fedbn)."""
    if alg.policy == "fedavg":
        return merge(state.shared, state.pooled)
    if alg.policy == "silobn":
        stats = state.local["batch_stats"]
        pooled = pool_batch_stats(stats, train_sizes, take_client(stats, 0))
        return merge(state.shared, {"batch_stats": pooled})
    return None


def client_model(alg: Algorithm, state: ServerState, c: int) -> Variables:
    """Client ``c``'s personal model: global shared/pooled leaves plus its own local leaves."""
    return alg.client_variables(state, take_client(state.local, c))


def evaluate_global(
    alg: Algorithm, state: ServerState, data: FederatedData, batch_size: int = 256
) -> Metrics | None:
    """The global model on the pooled test set of all clients (None under fedbn)."""
    variables = global_variables(alg, state, data.train.n)
    if variables is None:
        return None
    x, y = pooled_test(data)
    return evaluate_model(alg.local.model, variables, x, y, batch_size)


def evaluate_clients(
    alg: Algorithm, state: ServerState, data: FederatedData, batch_size: int = 256
) -> ClientMetrics:
    """Each client's model (its own local BN leaves) on its own test data."""
    x_C, y_C, n_C = (np.asarray(a) for a in (data.test.x, data.test.y, data.test.n))
    per = [
        evaluate_model(
            alg.local.model, client_model(alg, state, c), x_C[c, :n], y_C[c, :n], batch_size
        )
        for c, n in enumerate(n_C)
    ]
    loss, acc, count = (np.array(v) for v in zip(*per, strict=True))
    has = count > 0
    weighted = float(np.sum(acc[has] * count[has]) / max(np.sum(count), 1))
    return ClientMetrics(loss, acc, count, float(np.mean(acc[has])), weighted)
