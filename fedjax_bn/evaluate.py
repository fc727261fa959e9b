"""Evaluation, always with ``train=False``: the global model and each client's own model.

Which global model exists is the policy module's answer (``policy.global_variables``): fedavg
and silobn have one, fedbn has none (BN layers are personal) unless the model has no BN layer.
Per-client evaluation (each client's local leaves on its own test data) is reported for every
policy.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import numpy as np

from fedjax_bn import policy
from fedjax_bn.algorithms.base import Algorithm, FedState, client_variables, model_parts
from fedjax_bn.client import masked_cross_entropy
from fedjax_bn.data import FederatedData, pooled_test
from fedjax_bn.tree import Variables

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


def global_variables(alg: Algorithm, state: FedState, train_sizes: Array) -> Variables | None:
    """The global model under ``alg``'s policy, or None where the policy has none (fedbn)."""
    return policy.global_variables(alg.policy, *model_parts(state), train_sizes)


def client_model(alg: Algorithm, state: FedState, c: int) -> Variables:
    """Client ``c``'s personal model: global shared/pooled leaves plus its own local leaves."""
    return client_variables(state, c)


def evaluate_global(
    alg: Algorithm, state: FedState, data: FederatedData, batch_size: int = 256
) -> Metrics | None:
    """The global model on the pooled test set of all clients (None under fedbn)."""
    variables = global_variables(alg, state, data.train.n)
    if variables is None:
        return None
    x, y = pooled_test(data)
    return evaluate_model(alg.model, variables, x, y, batch_size)


def evaluate_clients(
    alg: Algorithm, state: FedState, data: FederatedData, batch_size: int = 256
) -> ClientMetrics:
    """Each client's model (its own local BN leaves) on its own test data."""
    x_C, y_C, n_C = (np.asarray(a) for a in (data.test.x, data.test.y, data.test.n))
    per = [
        evaluate_model(alg.model, client_model(alg, state, c), x_C[c, :n], y_C[c, :n], batch_size)
        for c, n in enumerate(n_C)
    ]
    loss, acc, count = (np.array(v) for v in zip(*per, strict=True))
    has = count > 0
    weighted = float(np.sum(acc[has] * count[has]) / max(np.sum(count), 1))
    return ClientMetrics(loss, acc, count, float(np.mean(acc[has])), weighted)
