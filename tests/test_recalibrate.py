"""Tests for exact federated BN recalibration and BN on batch statistics only (recalibrate.py).

Dense models only (no convolutions: cheap to compile). Expected statistics are numpy over the
concatenated real examples, or per-client train-mode batch statistics pooled by hand.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    IMAGE_SHAPE,
    CounterModel,
    assert_trees_close,
    assert_trees_equal,
    make_clients,
    sgd,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn.algorithms import Algorithm, FedState
from fedjax_bn.data import FederatedData
from fedjax_bn.monitor import probe_batch_stats
from fedjax_bn.recalibrate import evaluate_recalibrated, fedavg_batch_stats_only, recalibrate_bn
from fedjax_bn.tree import flatten

SIZES = (5, 8, 0, 3)  # a partial batch, two batches, an empty client, a small one
N_MAX = 8
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
BN = ("batch_stats", "CountedBN_0", "bn")
COUNTER = ("batch_stats", "CountedBN_0", "num_batches_tracked")


class TwoBN(nn.Module):
    """dense + BN + ReLU + dense + BN + ReLU + dense: a second BN fed by a normalized layer."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        m = None if mask is None else mask[:, None]
        for width in (6, 5):
            x = nn.Dense(width)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x, mask=m))
        return nn.Dense(3)(x)


class NoBN(nn.Module):
    """A linear classifier: nothing to recalibrate."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@functools.cache
def algorithm(name: str) -> Algorithm:
    build = {
        "fedavg": lambda: fb.fedavg(CounterModel(), sgd()),
        "fixbn": lambda: fb.fixbn(CounterModel(), sgd(), fix_round=1),
        "batch_only": lambda: fedavg_batch_stats_only(CounterModel(), sgd()),
        "two_bn": lambda: fb.fedavg(TwoBN(), sgd()),
        "fedbn": lambda: fb.fedbn(CounterModel(), sgd()),
        "no_bn": lambda: fb.fedavg(NoBN(), sgd()),
    }
    return build[name]()


@functools.cache
def round_fn(name: str) -> Any:
    return fb.make_round(algorithm(name), executor="sequential", batch_size=4)


def start(name: str, seed: int = 0) -> FedState:
    return algorithm(name).init(jax.random.key(seed), SAMPLE_X, len(SIZES))


def real_examples(seed: int) -> np.ndarray:
    """The clients' real (unpadded) training images, concatenated, flattened, float64."""
    train = make_clients(seed, SIZES, n_max=N_MAX)
    x = np.concatenate([np.asarray(train.x[c, :n]) for c, n in enumerate(SIZES)])
    return x.reshape(len(x), -1).astype(np.float64)


@pytest.mark.parametrize("name", ["fedavg", "fixbn"])
@settings(max_examples=3)
@given(seed=st.integers(0, 2**31 - 1))
def test_one_bn_layer_statistics_are_the_union_moments(name: str, seed: int) -> None:
    """Dense -> BN -> Dense: the recalibrated mean and variance are numpy's mean and biased
    variance of the dense outputs over every client's real examples, for any batch size."""
    state = start(name, seed % 1000)
    train = make_clients(seed, SIZES, n_max=N_MAX)
    dense = state.server.shared["params"]["Dense_0"]
    h = real_examples(seed) @ np.asarray(dense["kernel"], np.float64) + np.asarray(dense["bias"])
    for batch_size in (4, 16):
        new = recalibrate_bn(algorithm(name), state, train, batch_size=batch_size)
        stats = flatten(new.server.pooled)
        np.testing.assert_allclose(stats[(*BN, "mean")], h.mean(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(stats[(*BN, "var")], h.var(0), rtol=1e-4, atol=1e-4)
        assert stats[COUNTER].dtype == jnp.int32
        assert int(stats[COUNTER]) == int(flatten(state.server.pooled)[COUNTER])
        assert_trees_equal(new.server.shared, state.server.shared)
        assert_trees_equal(new.clients, state.clients)


def test_deeper_layers_use_train_mode_batch_statistics() -> None:
    """With every client's data in one batch, each layer's statistics are the clients'
    train-mode batch statistics (read independently, by ``probe_batch_stats``) pooled by size."""
    alg, state = algorithm("two_bn"), start("two_bn")
    train = make_clients(3, SIZES, n_max=N_MAX)
    new = recalibrate_bn(alg, state, train, batch_size=N_MAX)
    variables = fb.merge(state.server.shared, state.server.pooled)
    real = [c for c, n in enumerate(SIZES) if n]
    probes = [
        probe_batch_stats(alg.model, variables, train.x[c], jnp.arange(N_MAX) < SIZES[c])
        for c in real
    ]
    weights = jnp.asarray([SIZES[c] for c in real], jnp.float32)
    got = flatten(new.server.pooled["batch_stats"])
    assert len(got) == 4
    for path in got:
        if path[-1] != "mean":
            continue
        var_path = (*path[:-1], "var")
        mean, var = fb.pooled_moments(
            jnp.stack([flatten(p)[path] for p in probes]),
            jnp.stack([flatten(p)[var_path] for p in probes]),
            weights,
        )
        np.testing.assert_allclose(got[path], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[var_path], var, rtol=1e-4, atol=1e-5)


def test_batch_stats_only_trains_as_fedavg_and_keeps_no_statistics() -> None:
    """Same parameters as FedAvg after a round; the server's statistics untouched (bitwise)
    until recalibration, which then agrees with recalibrating FedAvg's model."""
    train = make_clients(5, SIZES, n_max=N_MAX)
    states = {}
    for name in ("fedavg", "batch_only"):
        states[name], _ = round_fn(name)(start(name), train, jax.random.key(1))
    avg, only = states["fedavg"], states["batch_only"]
    assert_trees_close(only.server.shared, avg.server.shared, rtol=1e-5, atol=1e-6)
    assert_trees_equal(only.server.pooled, start("batch_only").server.pooled)
    cal_avg = recalibrate_bn(algorithm("fedavg"), avg, train, batch_size=4)
    cal_only = recalibrate_bn(algorithm("batch_only"), only, train, batch_size=4)
    assert_trees_close(cal_only.server.pooled, cal_avg.server.pooled, rtol=1e-4, atol=1e-5)


def test_evaluate_recalibrated_is_evaluate_global_of_the_recalibrated_state() -> None:
    train = make_clients(6, SIZES, n_max=N_MAX)
    test = make_clients(7, (3, 2, 4, 1), n_max=4)
    data = FederatedData(train=train, test=test, num_classes=3)
    alg = algorithm("batch_only")
    state, _ = round_fn("batch_only")(start("batch_only"), train, jax.random.key(2))
    got = evaluate_recalibrated(alg, state, data, batch_size=8, recalibrate_batch_size=4)
    want = fb.evaluate_global(alg, recalibrate_bn(alg, state, data, batch_size=4), data, 8)
    assert got == want and got.count == 10


def test_policies_without_global_statistics_and_models_without_bn() -> None:
    train = make_clients(8, SIZES, n_max=N_MAX)
    with pytest.raises(ValueError, match="per client"):
        recalibrate_bn(algorithm("fedbn"), start("fedbn"), train)
    state = start("no_bn")
    assert recalibrate_bn(algorithm("no_bn"), state, train) is state
    with pytest.raises(ValueError, match="batch_size"):
        recalibrate_bn(algorithm("fedavg"), start("fedavg"), train, batch_size=0)
    with pytest.raises(TypeError):
        fedavg_batch_stats_only(CounterModel(), sgd(), policy="fedbn")
