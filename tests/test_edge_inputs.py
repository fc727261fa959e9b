"""Edge inputs: a model with a ``train`` default or without BatchNorm, clients with no data,
zero total weight, labels out of range, given initial variables, hand-built client arrays.
Each test checks the behaviour, never a golden number.

Models are dense-only (cheap to compile); data are hand-built ``ClientArrays`` or per-client
arrays, so every case states exactly what it feeds the library.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, NUM_CLASSES, CounterModel, normal, randint, sgd

import fedjax_bn as fb
from fedjax_bn.aggregate import pooled_moments
from fedjax_bn.data import ClientArrays, FederatedData, pooled_test
from fedjax_bn.policy import partition
from fedjax_bn.tree import flatten, unflatten

SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)


class DefaultTrain(nn.Module):
    """``train`` keyword-only but with a default: BN's mode could be left implicit."""

    @nn.compact
    def __call__(
        self, x: jax.Array, *, train: bool = False, mask: jax.Array | None = None
    ) -> jax.Array:
        x = nn.BatchNorm(use_running_average=not train)(x.reshape((x.shape[0], -1)))
        return nn.Dense(NUM_CLASSES)(x)


class DenseOnly(nn.Module):
    """No BatchNorm at all; accepts ``train`` and ``mask`` as the protocol asks."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = x.reshape((x.shape[0], -1)).astype(jnp.float32)
        return nn.Dense(NUM_CLASSES)(nn.relu(nn.Dense(8)(x)))


def test_a_wrong_train_default_cannot_put_local_training_in_eval_mode() -> None:
    """``train: bool = False`` (the seed's bug as a default): the library states the mode at
    every call, so local training still computes batch statistics and updates running ones."""
    alg = fb.fedbn(DefaultTrain(), sgd())
    train = fb.data.from_client_arrays(*client_data(0, (5, 3), (4, 2)), num_classes=NUM_CLASSES)
    state = alg.init(jax.random.key(0), SAMPLE_X, train.num_clients)
    state, _ = fb.make_round(alg, batch_size=4)(state, train.train, jax.random.key(1))
    means = np.asarray(state.clients.local["batch_stats"]["BatchNorm_0"]["mean"])
    assert np.all(np.any(means != 0, axis=tuple(range(1, means.ndim))))


def client_data(seed: int, train_sizes: tuple[int, ...], test_sizes: tuple[int, ...]) -> Any:
    """Per-client (x, y) arrays for train and test, labels in [0, NUM_CLASSES)."""
    out = []
    for salt, sizes in ((0, train_sizes), (1, test_sizes)):
        xs = [normal(seed, (n, *IMAGE_SHAPE), salt=10 * salt + c) for c, n in enumerate(sizes)]
        ys = [randint(seed, (n,), NUM_CLASSES, salt=10 * salt + c + 5) for c, n in enumerate(sizes)]
        out.append(([x.astype(np.float32) for x in xs], [y.astype(np.int32) for y in ys]))
    (train_xs, train_ys), (test_xs, test_ys) = out
    return train_xs, train_ys, test_xs, test_ys


@pytest.mark.parametrize("policy", ["silobn", "fedbn"])
def test_a_model_without_batch_norm_has_a_global_model_under_every_policy(policy: str) -> None:
    """A model with no BN layer has a global model under every policy: under fedbn it is the
    shared parameters (the whole model), under silobn shared + nothing to pool."""
    data = fb.data.from_client_arrays(*client_data(0, (5, 3), (4, 2)), num_classes=NUM_CLASSES)
    alg = fb.make_algorithm(DenseOnly(), sgd(), policy=policy)
    state = alg.init(jax.random.key(0), SAMPLE_X, data.num_clients)
    assert flatten(state.clients.local) == {}
    rnd = fb.make_round(alg, executor="sequential", batch_size=4)
    state, _ = rnd(state, data.train, jax.random.key(1))
    metrics = fb.evaluate_global(alg, state, data)
    assert metrics is not None
    assert metrics.count == 6
    assert math.isfinite(metrics.loss) and 0.0 <= metrics.accuracy <= 1.0
    x, y = pooled_test(data)
    assert metrics == fb.evaluate_model(alg.model, state.server.shared, x, y)


ZERO_EXECUTORS = ("sequential", "vmap", "chunked")


@pytest.mark.parametrize("executor", ZERO_EXECUTORS)
def test_a_round_of_only_empty_clients_raises_before_training(executor: str) -> None:
    """Every client with zero examples: a ValueError mentioning zero, before any training."""
    alg = fb.fedavg(CounterModel(), sgd())
    state = alg.init(jax.random.key(0), SAMPLE_X, 2)
    train = ClientArrays(
        x=jnp.zeros((2, 4, *IMAGE_SHAPE), jnp.float32),
        y=jnp.zeros((2, 4), jnp.int32),
        n=jnp.zeros((2,), jnp.int32),
    )
    rnd = fb.make_round(alg, executor=executor, batch_size=2, chunk_size=1)
    with pytest.raises(ValueError, match="zero"):
        rnd(state, train, jax.random.key(0))


def test_zero_total_weight_is_refused_by_pooling_and_averaging() -> None:
    """pooled_moments refuses all-zero weights as weighted_mean does."""
    mean_CX, var_CX = jnp.ones((2, 3)), jnp.ones((2, 3))
    with pytest.raises(ValueError, match="Total client weight is zero"):
        pooled_moments(mean_CX, var_CX, jnp.zeros(2))
    with pytest.raises(ValueError, match="Total client weight is zero"):
        fb.weighted_mean({"a": mean_CX}, jnp.zeros(2), {"a": jnp.ones(3)})


@functools.cache
def dense_round(executor: str) -> tuple[Any, Any]:
    alg = fb.fedavg(DenseOnly(), sgd())
    return alg, fb.make_round(alg, executor=executor, batch_size=4)


def labelled(y: np.ndarray, n: tuple[int, ...]) -> ClientArrays:
    """Hand-built client arrays of the given (padded) labels and true sizes."""
    c, n_max = y.shape
    x = normal(3, (c, n_max, *IMAGE_SHAPE)).astype(np.float32)
    return ClientArrays(x=jnp.asarray(x), y=jnp.asarray(y, jnp.int32), n=jnp.asarray(n, jnp.int32))


@pytest.mark.parametrize("executor", ["sequential", "vmap"])
@pytest.mark.parametrize("bad", [NUM_CLASSES, -1, 100])
def test_real_labels_out_of_range_raise_padded_ones_are_ignored(executor: str, bad: int) -> None:
    """A real label outside [0, num_classes) raises naming the range; arbitrary labels in
    padded positions (past a client's size) do not, and the round runs."""
    alg, rnd = dense_round(executor)
    state = alg.init(jax.random.key(0), SAMPLE_X, 2)
    y = np.array([[0, 1, 2, 0], [2, 1, 0, 0]])
    y_bad = y.copy()
    y_bad[1, 2] = bad  # client 1 holds 3 real examples: position 2 is real
    with pytest.raises(ValueError, match=rf"\[0, {NUM_CLASSES}\)"):
        rnd(state, labelled(y_bad, (4, 3)), jax.random.key(0))
    y_pad = y.copy()
    y_pad[1, 3] = bad  # position 3 is padding for client 1
    y_pad[0, 2:] = 10 * bad + 7  # and positions 2, 3 for client 0
    new, metrics = rnd(state, labelled(y_pad, (2, 3)), jax.random.key(0))
    np.testing.assert_array_equal(metrics.num_seen, [2, 3])
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(new.server.shared))
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in metrics.loss)


@pytest.mark.parametrize("policy", ["fedavg", "fedbn"])
def test_init_from_given_variables_starts_every_part_from_them(policy: str) -> None:
    """``alg.init(variables, ...)`` starts from them: the state's shared leaves are theirs."""
    model = CounterModel()
    alg = fb.make_algorithm(model, sgd(), policy=policy)
    variables = jax.tree.map(np.asarray, dict(model.init(jax.random.key(3), SAMPLE_X, train=False)))
    flat = {p: v + 1.5 if v.dtype.kind == "f" else v + 2 for p, v in flatten(variables).items()}
    given = unflatten(flat)
    state = alg.init(given, SAMPLE_X, 2)
    want = partition(jax.tree.map(jnp.asarray, given), policy)
    got_shared, want_shared = flatten(state.server.shared), flatten(want.shared)
    assert set(got_shared) == set(want_shared)
    for path, leaf in want_shared.items():
        np.testing.assert_array_equal(got_shared[path], leaf, err_msg=str(path))
        assert got_shared[path].dtype == leaf.dtype
    for path, leaf in flatten(want.pooled).items():
        np.testing.assert_array_equal(flatten(state.server.pooled)[path], leaf)
    for path, leaf in flatten(want.local).items():  # every client starts from the given leaves
        np.testing.assert_array_equal(flatten(state.clients.local)[path][1], leaf)


def test_init_names_a_wrong_or_missing_given_leaf() -> None:
    """A wrong-shaped or missing leaf in the given variables raises naming its path."""
    model = CounterModel()
    alg = fb.fedavg(model, sgd())
    variables = dict(model.init(jax.random.key(0), SAMPLE_X, train=False))
    flat = flatten(variables)
    kernel = ("params", "Dense_0", "kernel")
    wrong = unflatten({**flat, kernel: jnp.zeros((3, 3), jnp.float32)})
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
        alg.init(wrong, SAMPLE_X, 2)
    missing = unflatten({p: v for p, v in flat.items() if p != kernel})
    with pytest.raises(ValueError, match="params/Dense_0/kernel"):
        alg.init(missing, SAMPLE_X, 2)


def test_from_client_arrays_pads_with_zeros_and_refuses_bad_labels() -> None:
    """Sizes, zero padding past each client's size, labels in place, test clients may be
    empty; an out-of-range label and a client without train examples are refused."""
    train_xs, train_ys, test_xs, test_ys = client_data(1, (3, 5, 1), (2, 0, 4))
    data = fb.data.from_client_arrays(
        train_xs, train_ys, test_xs, test_ys, num_classes=NUM_CLASSES, domains=("a", "b", "c")
    )
    assert isinstance(data, FederatedData)
    assert data.num_clients == 3 and data.num_classes == NUM_CLASSES
    assert data.domains == ("a", "b", "c")
    np.testing.assert_array_equal(data.train_sizes(), [3, 5, 1])
    np.testing.assert_array_equal(np.asarray(data.test.n), [2, 0, 4])
    assert data.train.x.shape == (3, 5, *IMAGE_SHAPE) and data.train.y.shape == (3, 5)
    assert data.test.x.shape == (3, 4, *IMAGE_SHAPE)
    assert data.train.y.dtype == jnp.int32
    for split, xs, ys in ((data.train, train_xs, train_ys), (data.test, test_xs, test_ys)):
        x, y = np.asarray(split.x), np.asarray(split.y)
        for c, (xc, yc) in enumerate(zip(xs, ys, strict=True)):
            n = len(yc)
            np.testing.assert_array_equal(x[c, :n], xc)
            np.testing.assert_array_equal(y[c, :n], yc)
            assert not np.any(x[c, n:]) and not np.any(y[c, n:])
    bad_ys = [y.copy() for y in train_ys]
    bad_ys[1][4] = NUM_CLASSES
    with pytest.raises(ValueError, match=rf"\[0, {NUM_CLASSES}\)"):
        fb.data.from_client_arrays(train_xs, bad_ys, test_xs, test_ys, num_classes=NUM_CLASSES)
    bad_test = [y.copy() for y in test_ys]
    bad_test[2][0] = -1
    with pytest.raises(ValueError, match="test labels"):
        fb.data.from_client_arrays(train_xs, train_ys, test_xs, bad_test, num_classes=NUM_CLASSES)
    empty_xs = [train_xs[0], train_xs[1][:0], train_xs[2]]
    empty_ys = [train_ys[0], train_ys[1][:0], train_ys[2]]
    with pytest.raises(ValueError, match=r"clients \[1\] have no train examples"):
        fb.data.from_client_arrays(empty_xs, empty_ys, test_xs, test_ys, num_classes=NUM_CLASSES)
