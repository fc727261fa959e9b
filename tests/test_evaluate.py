"""Tests for fedjax_bn.evaluate: eval mode, padding, global vs per-client models.

``BNLogits`` makes the answers hand-computable: its logits are one BatchNorm of the input, so
on all-zero inputs the predicted class is ``argmax(bias - mean / sqrt(var + eps) * scale)``,
which the tests set per client through the policy's local (or pooled) BN leaves.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, CounterModel, normal, randint, sgd
from hypothesis import given
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn.algorithms import FedState
from fedjax_bn.data import FederatedData, stack_clients
from fedjax_bn.evaluate import client_model, global_variables
from fedjax_bn.policy import merge

K = 4  # classes
C = 3  # clients


class BNLogits(nn.Module):
    """logits = BatchNorm(x) over K features: eval-mode output is set by the BN leaves."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        bn_mask = None if mask is None else mask[:, None]
        return nn.BatchNorm(use_running_average=not train, name="norm")(x, mask=bn_mask)


def digits_like(test_sizes: tuple[int, ...], seed: int) -> FederatedData:
    """All-zero inputs [1, 1, K] with random labels; train sizes 2, 6, 4 (pooling weights)."""
    train_sizes = (2, 6, 4)

    def split(sizes: tuple[int, ...], salt: int) -> Any:
        ys = [randint(seed, (n,), K, salt=salt + c).astype(np.int32) for c, n in enumerate(sizes)]
        return stack_clients([np.zeros((n, 1, 1, K), np.float32) for n in sizes], ys)

    return FederatedData(train=split(train_sizes, 0), test=split(test_sizes, 10), num_classes=K)


def build(policy: str) -> tuple[Any, FedState]:
    """The algorithm for ``policy`` on BNLogits and its initial state."""
    alg = {"fedavg": fb.fedavg, "fedbn": fb.fedbn, "silobn": fb.silobn}[policy](BNLogits(), sgd())
    return alg, alg.init(jax.random.key(0), jnp.zeros((1, 1, 1, K)), C)


def with_local(state: FedState, local: dict[str, Any]) -> FedState:
    """``state`` with the clients' local leaves replaced by ``local``."""
    return state._replace(clients=state.clients._replace(local=local))


def with_local_means(state: FedState, means_CK: np.ndarray) -> FedState:
    """``state`` with per-client BN running means ``means_CK`` (variances 1)."""
    local = dict(state.clients.local)
    local["batch_stats"] = {"norm": {"mean": jnp.asarray(means_CK), "var": jnp.ones((C, K))}}
    return with_local(state, local)


def expected_accuracy(y: np.ndarray, predicted: int) -> float:
    """Accuracy of always predicting ``predicted``."""
    return float(np.mean(y == predicted))


def test_fedbn_clients_are_evaluated_with_their_own_bn() -> None:
    """Client c's local BN bias makes it predict class c: its accuracy is the share of c's."""
    alg, state = build("fedbn")
    bias = np.zeros((C, K), np.float32)
    bias[np.arange(C), np.arange(C)] = 10.0
    local = dict(state.clients.local)
    local["params"] = {"norm": {"scale": jnp.ones((C, K)), "bias": jnp.asarray(bias)}}
    state = with_local(state, local)
    data = digits_like((5, 0, 7), seed=1)
    assert fb.evaluate_global(alg, state, data) is None
    assert global_variables(alg, state, data.train.n) is None
    m = fb.evaluate_clients(alg, state, data)
    y, n = np.asarray(data.test.y), np.asarray(data.test.n)
    want = [expected_accuracy(y[c, : n[c]], c) if n[c] else np.nan for c in range(C)]
    np.testing.assert_allclose(m.accuracy, want)
    np.testing.assert_array_equal(m.count, n)
    assert m.mean_accuracy == pytest.approx((want[0] + want[2]) / 2)  # the empty client is out
    assert m.weighted_accuracy == pytest.approx((5 * want[0] + 7 * want[2]) / 12)
    assert np.isnan(m.loss[1]) and np.all(np.isfinite(m.loss[[0, 2]]))
    x = np.asarray(data.test.x)
    own = fb.evaluate_model(BNLogits(), client_model(alg, state, 2), x[2, :7], y[2, :7])
    assert (own.loss, own.accuracy) == pytest.approx((m.loss[2], m.accuracy[2]))


def test_silobn_global_model_pools_local_statistics_by_train_size() -> None:
    """Client c's running mean -10 e_c makes it predict c; the global model pools the means
    by train size (2, 6, 4), so it predicts client 1's class everywhere."""
    alg, state = build("silobn")
    state = with_local_means(state, -10.0 * np.eye(C, K, dtype=np.float32))
    data = digits_like((5, 3, 7), seed=2)
    y, n = np.asarray(data.test.y), np.asarray(data.test.n)
    per = fb.evaluate_clients(alg, state, data)
    np.testing.assert_allclose(per.accuracy, [expected_accuracy(y[c, : n[c]], c) for c in range(C)])
    g = fb.evaluate_global(alg, state, data)
    pooled_y = np.concatenate([y[c, : n[c]] for c in range(C)])
    assert g.count == 15 and g.accuracy == pytest.approx(expected_accuracy(pooled_y, 1))
    stats = global_variables(alg, state, data.train.n)["batch_stats"]["norm"]
    w = np.array([2, 6, 4]) / 12
    want_mean = w @ (-10.0 * np.eye(C, K))
    np.testing.assert_allclose(stats["mean"], want_mean, rtol=1e-6)
    np.testing.assert_allclose(
        stats["var"], 1.0 + w @ (100.0 * np.eye(C, K)) - want_mean**2, rtol=1e-5
    )


def test_fedavg_global_model_is_shared_plus_pooled() -> None:
    """fedavg's global model is shared + pooled leaves; per-client views agree with it."""
    alg, state = build("fedavg")
    mean = np.zeros(K, np.float32)
    mean[3] = -10.0
    pooled = {"batch_stats": {"norm": {"mean": jnp.asarray(mean), "var": jnp.ones(K)}}}
    state = state._replace(server=state.server._replace(pooled=pooled))
    data = digits_like((5, 3, 7), seed=3)
    variables = global_variables(alg, state, data.train.n)
    assert jax.tree.structure(variables) == jax.tree.structure(
        merge(state.server.shared, state.server.pooled)
    )
    g = fb.evaluate_global(alg, state, data)
    _, y = fb.data.pooled_test(data)
    assert g.accuracy == pytest.approx(expected_accuracy(y, 3))
    # Every client sees the same global model under fedavg.
    per = fb.evaluate_clients(alg, state, data)
    assert per.weighted_accuracy == pytest.approx(g.accuracy)


def test_evaluate_hand_computed_loss_and_empty_set() -> None:
    """Zero inputs, mean 0, var 1, bias b: logits b for every example; loss = mean CE(b, y)."""
    model = BNLogits()
    bias = np.array([0.0, 1.0, 2.0, 0.5], np.float32)
    variables = {
        "params": {"norm": {"scale": jnp.ones(K), "bias": jnp.asarray(bias)}},
        "batch_stats": {"norm": {"mean": jnp.zeros(K), "var": jnp.ones(K)}},
    }
    y = np.array([0, 2, 2, 1, 3], np.int32)
    x = np.zeros((5, 1, 1, K), np.float32)
    m = fb.evaluate_model(model, variables, x, y, batch_size=2)  # 3 batches, the last one padded
    ce = np.log(np.exp(bias).sum()) - bias[y]
    assert m.count == 5
    assert m.accuracy == pytest.approx(2 / 5)  # argmax b = 2
    assert m.loss == pytest.approx(ce.mean(), rel=1e-5)
    empty = fb.evaluate_model(model, variables, x[:0], y[:0], batch_size=2)
    assert empty.count == 0 and np.isnan(empty.loss) and np.isnan(empty.accuracy)


@functools.cache
def counter_variables() -> dict[str, Any]:
    """CounterModel variables with non-trivial BN statistics (eval mode must use them)."""
    init = jax.jit(functools.partial(CounterModel().init, train=False))
    variables = dict(init(jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE))))
    stats = variables["batch_stats"]["CountedBN_0"]
    bn = stats["bn"]
    stats["bn"] = {
        "mean": jnp.asarray(normal(0, bn["mean"].shape)),
        "var": jnp.asarray(np.exp(normal(1, bn["var"].shape))),
    }
    return variables


@given(n=st.integers(1, 20), batch_size=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**31 - 1))
def test_evaluate_does_not_depend_on_batching(n: int, batch_size: int, seed: int) -> None:
    """Eval mode (running statistics) makes every example's prediction independent of its
    batch, so batch size and padding change nothing."""
    x = normal(seed, (n, *IMAGE_SHAPE)).astype(np.float32)
    y = randint(seed, (n,), 3, salt=1).astype(np.int32)
    variables = counter_variables()
    a = fb.evaluate_model(CounterModel(), variables, x, y, batch_size=batch_size)
    b = fb.evaluate_model(CounterModel(), variables, x, y, batch_size=32)
    assert a.count == b.count == n
    assert a.accuracy == pytest.approx(b.accuracy)
    assert a.loss == pytest.approx(b.loss, rel=1e-5)
