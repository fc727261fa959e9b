"""Tests for fedjax_bn.monitor: BN statistics / affine divergence and probe statistics."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_clients, tiny_cnn
from hypothesis import given
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn import monitor
from fedjax_bn.data import ClientArrays, digits_feature_shift, digits_label_skew


def random_stats(seed: int, c: int, x: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=(c, x)).astype(np.float32)
    return mean, np.exp(rng.normal(size=(c, x))).astype(np.float32)


def stats_tree(mean_CX: jax.Array, var_CX: jax.Array) -> dict:
    """A stacked batch_stats collection with one nested BN layer and an integer counter."""
    c = mean_CX.shape[0]
    layer = {"mean": mean_CX, "var": var_CX, "count": jnp.zeros((c,), jnp.int32)}
    return {"Block_0": {"Norm": layer}}


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**16))
def test_mean_pairwise_sq_diff_matches_explicit_pairs(c: int, x: int, seed: int) -> None:
    values, _ = random_stats(seed, c, x)
    pairs = list(itertools.combinations(range(c), 2))
    expected = (
        np.mean([np.square(values[i] - values[j]) for i, j in pairs], axis=0)
        if pairs
        else np.zeros(x)
    )
    np.testing.assert_allclose(
        monitor.mean_pairwise_sq_diff(values), expected, rtol=1e-4, atol=1e-6
    )


@given(st.integers(1, 6), st.integers(1, 5), st.integers(0, 2**16))
def test_w2_divergence_is_zero_for_identical_clients(c: int, x: int, seed: int) -> None:
    mean, var = random_stats(seed, 1, x)
    mean_CX, var_CX = np.repeat(mean, c, 0), np.repeat(var, c, 0)
    div = monitor.bn_stats_divergence(stats_tree(mean_CX, var_CX))
    assert list(div) == ["Block_0/Norm"]
    np.testing.assert_allclose(div["Block_0/Norm"], 0.0, atol=1e-6)


@given(
    st.integers(2, 6),
    st.integers(1, 5),
    st.integers(0, 2**16),
    st.floats(0.1, 5.0),
    st.floats(0.5, 3.0),
)
def test_w2_divergence_grows_with_shift(c: int, x: int, seed: int, shift: float, scale: float):
    """Shifting one client's means by ``shift`` gives exactly the closed form, and more shift
    (or an extra spread) means more divergence."""
    mean, var = random_stats(seed, 1, x)
    mean_CX, var_CX = np.repeat(mean, c, 0), np.repeat(var, c, 0)
    offset = np.zeros((c, 1), np.float32)
    offset[0] = shift
    div = monitor.gaussian_w2_divergence(mean_CX + offset, var_CX)
    # Client 0 differs from the c-1 others by shift^2 per channel: (c-1) of c(c-1)/2 pairs.
    np.testing.assert_allclose(div, shift**2 * 2 / c, rtol=1e-4)
    assert monitor.gaussian_w2_divergence(mean_CX + 2 * offset, var_CX) > div
    spread = var_CX * np.where(offset > 0, (1.0 + scale) ** 2, 1.0).astype(np.float32)
    assert monitor.gaussian_w2_divergence(mean_CX + offset, spread) > div


def test_divergence_ignores_client_order() -> None:
    mean, var = random_stats(3, 5, 4)
    perm = np.array([3, 1, 4, 0, 2])
    a = monitor.gaussian_w2_divergence(mean, var)
    np.testing.assert_allclose(monitor.gaussian_w2_divergence(mean[perm], var[perm]), a, rtol=1e-5)


class InputBN(nn.Module):
    """BatchNorm straight on the input, so its batch statistics are the data's."""

    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        m = None if mask is None else mask[:, None, None, None]
        x = nn.BatchNorm(use_running_average=not train, momentum=self.momentum)(x, mask=m)
        return nn.Dense(2)(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0])
def test_probe_batch_stats_are_the_masked_batch_moments(momentum: float) -> None:
    model = InputBN(momentum=momentum)
    x = jax.random.normal(jax.random.key(0), (6, 4, 4, 3)) * 2.0 + 1.0
    mask = jnp.array([True, True, True, True, False, False])
    variables = model.init(jax.random.key(1), x, train=False)
    stats = monitor.probe_batch_stats(model, variables, x, mask)["BatchNorm_0"]
    real = np.asarray(x[:4]).reshape(-1, 3)
    np.testing.assert_allclose(stats["mean"], real.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["var"], real.var(0), rtol=1e-4, atol=1e-5)


def test_probe_batches_mask_past_each_client_size() -> None:
    train = make_clients(0, (5, 2, 7))
    x, mask = monitor.probe_batches(train, 4)
    assert x.shape == (3, 4, *train.x.shape[2:])
    np.testing.assert_array_equal(mask.sum(1), [4, 2, 4])
    with pytest.raises(ValueError, match="probe size"):
        monitor.probe_batches(train, 0)


def same_data(train: ClientArrays) -> ClientArrays:
    """Every client holds client 0's data."""
    return jax.tree.map(lambda a: jnp.broadcast_to(a[:1], a.shape), train)


@pytest.mark.parametrize("make", [fb.fedavg, fb.fedbn])
def test_round_divergences_zero_for_identical_clients_positive_when_shifted(make) -> None:
    alg = make(tiny_cnn(), optax.sgd(0.1))
    shifted = make_clients(1, (8, 8, 8))  # each client has its own offset and scale
    identical = same_data(shifted)
    measure = jax.jit(lambda s, x, m: monitor.round_divergences(alg, s, x, m))
    # One batch per client holds all its examples, so identical clients train identically.
    round_fn = fb.make_round(alg, executor="sequential", batch_size=8)
    for train, zero in ((identical, True), (shifted, False)):
        state = alg.init(jax.random.key(0), train.x[0, :1], 3)
        state, _ = round_fn(state, train, jax.random.key(1))
        div = measure(state, *monitor.probe_batches(train, 8))
        for kind in ("bn", "probe"):
            value = float(monitor.mean_over_layers(div[kind]))
            assert value == pytest.approx(0.0, abs=1e-8) if zero else value > 1e-4, (kind, value)
        assert bool(div["affine"]) == (make is fb.fedbn)  # only fedbn keeps BN scale/bias local
        if make is fb.fedbn:
            affine = float(monitor.mean_over_layers(div["affine"]))
            assert affine == pytest.approx(0.0, abs=1e-10) if zero else affine > 0
        expected_source = "probe" if make is fb.fedavg else "local"
        assert monitor.stats_source(state) == expected_source


def test_affine_divergence_finds_bn_params_structurally() -> None:
    alg = fb.fedbn(tiny_cnn(), optax.sgd(0.1))
    state = alg.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)), 4)
    layers = monitor.bn_affine_divergence(state.clients.local)
    assert list(layers) == ["ConvBNReLU_0/BatchNorm_0"]
    assert float(layers["ConvBNReLU_0/BatchNorm_0"]) == 0.0
    bumped = jax.tree.map(lambda a: a, state.clients.local)
    scale = bumped["params"]["ConvBNReLU_0"]["BatchNorm_0"]["scale"]
    bumped["params"]["ConvBNReLU_0"]["BatchNorm_0"]["scale"] = scale.at[0].add(1.0)
    # Client 0 differs by 1 on every channel: 3 of the 6 pairs.
    np.testing.assert_allclose(
        monitor.bn_affine_divergence(bumped)["ConvBNReLU_0/BatchNorm_0"], 0.5
    )
    assert bool(jnp.isnan(monitor.mean_over_layers({})))


def test_feature_shift_diverges_more_than_label_skew_on_digits() -> None:
    """The practitioner's reading: same model, feature-shifted clients' BN inputs differ more."""
    model = fb.SeedCNN(num_classes=10, widths=(8,), hidden=16)
    alg = fb.fedavg(model, optax.sgd(0.1))
    measure = jax.jit(lambda s, x, m: monitor.round_divergences(alg, s, x, m))
    divs = {}
    for name, data in (
        ("label_skew", digits_label_skew(6, 0.5, seed=0)),
        ("feature_shift", digits_feature_shift(6, seed=0)),
    ):
        state = alg.init(jax.random.key(0), data.train.x[0, :1], data.num_clients)
        div = measure(state, *monitor.probe_batches(data.train, 64))
        divs[name] = float(monitor.mean_over_layers(div["probe"]))
    assert divs["feature_shift"] > 5 * divs["label_skew"] > 0, divs
