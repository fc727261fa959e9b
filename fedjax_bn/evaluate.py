"""Evaluation, always with ``train=False``: the global model and each client's own model.

Which global model exists is the policy module's answer (``policy.global_variables``): fedavg
and silobn have one, fedbn has none (BN layers are personal) unless the model has no BN layer.
Per-client evaluation (each client's local leaves on its own test data) is reported for every
policy.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
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
    ids: np.ndarray | None = None  # the client ids evaluated, in the order of the arrays


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
    alg: Algorithm,
    state: FedState,
    data: FederatedData,
    batch_size: int = 256,
    *,
    clients: Sequence[int] | None = None,
    adapt: Collection[int] = (),
) -> ClientMetrics:
    """Each client's model (its own local BN leaves) on its own test data.

    ``clients``: evaluate only these client ids (a sample, for populations too large to
    evaluate every round; default all). Clients in ``adapt`` first get their BN running
    statistics recomputed on their own training images (AdaBN, :func:`fedjax_bn.adapt_bn`; no
    labels used): for clients that never trained, whose local BN is still the initial one.
    One client's model at a time is built, so memory does not grow with the population.
    """
    ids = range(len(np.asarray(data.test.n))) if clients is None else clients
    ids = np.asarray(ids, dtype=np.int64)
    n_C = np.asarray(data.test.n)
    if ids.size == 0:
        raise ValueError("evaluate_clients needs at least one client id, got none.")
    if ids.min() < 0 or ids.max() >= len(n_C):
        raise ValueError(f"client ids must lie in [0, {len(n_C)}), got {ids.tolist()}.")
    from fedjax_bn.adapt import adapt_variables  # adapt -> recalibrate -> evaluate: no cycle

    per = []
    for c in ids.tolist():
        variables = client_model(alg, state, c)
        if c in adapt:
            x_train = data.train.client(c)[0]
            variables = adapt_variables(alg.model, variables, x_train, batch_size=batch_size)
        x, y = data.test.client(c)
        per.append(evaluate_model(alg.model, variables, x, y, batch_size))
    loss, acc, count = (np.array(v) for v in zip(*per, strict=True))
    has = count > 0
    weighted = float(np.sum(acc[has] * count[has]) / max(np.sum(count), 1))
    mean = float(np.mean(acc[has])) if has.any() else float("nan")
    return ClientMetrics(loss, acc, count, mean, weighted, ids)
