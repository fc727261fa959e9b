"""Tests for the models' normalization choices (models.py ``norm=``) and ``WSConv``.

Rounds use one geometry (2 clients of sizes (5, 8), N_max 8, batch 8: one full and one masked
step) on 8x8 images, with the smallest widths each norm allows.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, NUM_CLASSES, init_shapes, make_clients, sgd
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn.data import FederatedData
from fedjax_bn.models import NORMS, DigitModel, SeedCNN, WSConv, standardize_kernel, ws_kernel
from fedjax_bn.policy import has_batch_norm
from fedjax_bn.tree import flatten

SIZES = (5, 8)
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)


def seed_cnn(norm: str) -> SeedCNN:
    return SeedCNN(num_classes=NUM_CLASSES, widths=(4,), hidden=8, norm=norm)


def digit_model(norm: str) -> DigitModel:
    # fc width 64: 32 groups of 2 under GroupNorm (a group of one dense feature is refused)
    return DigitModel(num_classes=NUM_CLASSES, conv_widths=(4, 4), fc_widths=(64,), norm=norm)


MODELS = {"seed_cnn": seed_cnn, "digit_model": digit_model}


@functools.cache
def algorithm(model: str, norm: str, policy: str) -> fb.Algorithm:
    factory = {"fedavg": fb.fedavg, "fedbn": fb.fedbn}[policy]
    return factory(MODELS[model](norm), sgd())


@functools.cache
def round_fn(model: str, norm: str, policy: str) -> Any:
    return fb.make_round(algorithm(model, norm, policy), executor="sequential", batch_size=8)


def test_batch_norm_keeps_todays_variable_names() -> None:
    """``norm="batch"`` (the default) has exactly the layers and names it always had."""
    assert SeedCNN() == SeedCNN(norm="batch")
    paths = {"/".join(p) for p in flatten(init_shapes(seed_cnn("batch"), SAMPLE_X))}
    assert paths == {
        "batch_stats/ConvBNReLU_0/BatchNorm_0/mean",
        "batch_stats/ConvBNReLU_0/BatchNorm_0/var",
        "params/ConvBNReLU_0/BatchNorm_0/bias",
        "params/ConvBNReLU_0/BatchNorm_0/scale",
        "params/ConvBNReLU_0/Conv_0/bias",
        "params/ConvBNReLU_0/Conv_0/kernel",
        "params/Dense_0/bias",
        "params/Dense_0/kernel",
        "params/Dense_1/bias",
        "params/Dense_1/kernel",
    }
    digit = {"/".join(p[1:]) for p in flatten(init_shapes(digit_model("batch"), SAMPLE_X))}
    assert {"BatchNorm_0/mean", "ConvBNReLU_1/BatchNorm_0/var", "BatchNorm_0/scale"} <= digit


@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("norm", NORMS)
def test_only_batch_norm_has_batch_stats(model: str, norm: str) -> None:
    variables = init_shapes(MODELS[model](norm), SAMPLE_X)
    assert has_batch_norm(variables) == (norm == "batch")
    assert ("batch_stats" in variables) == (norm == "batch")
    names = " ".join("/".join(p) for p in flatten(variables))
    expected = {"batch": "BatchNorm", "group": "GroupNorm", "layer": "LayerNorm", "none": "WSConv"}
    assert expected[norm] in names


@pytest.mark.parametrize("policy", ["fedavg", "fedbn"])
@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_trains_a_round_under_every_policy(norm: str, policy: str) -> None:
    """A round trains (finite, moved params); without BN nothing is local under fedbn and the
    global model exists and evaluates."""
    alg = algorithm("seed_cnn", norm, policy)
    state = alg.init(jax.random.key(0), SAMPLE_X, len(SIZES))
    train = make_clients(1, SIZES, n_max=8)
    new, result = round_fn("seed_cnn", norm, policy)(state, train, jax.random.key(1))
    assert np.all(np.isfinite(np.asarray(result.loss)))
    before, after = (jax.tree.leaves(s.server.shared) for s in (state, new))
    assert any(np.any(np.asarray(a) != np.asarray(b)) for a, b in zip(after, before, strict=True))
    if norm != "batch":
        assert new.clients.local == {}
    data = FederatedData(train=train, test=make_clients(2, (3, 4), n_max=4), num_classes=3)
    metrics = fb.evaluate_global(alg, new, data, batch_size=8)
    if policy == "fedbn" and norm == "batch":
        assert metrics is None  # BN layers are personal: no global model
    else:
        assert metrics is not None and metrics.count == 7 and np.isfinite(metrics.loss)


@pytest.mark.parametrize("norm", NORMS)
def test_digit_model_trains_a_round_under_fedbn(norm: str) -> None:
    alg = algorithm("digit_model", norm, "fedbn")
    state = alg.init(jax.random.key(0), SAMPLE_X, len(SIZES))
    new, result = round_fn("digit_model", norm, "fedbn")(
        state, make_clients(3, SIZES, n_max=8), jax.random.key(2)
    )
    assert np.all(np.isfinite(np.asarray(result.loss))) and int(new.round) == 1


@settings(max_examples=5)
@given(seed=st.integers(0, 2**31 - 1), scale=st.floats(0.01, 100.0))
def test_standardized_kernel_has_zero_mean_and_unit_variance(seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 2, 5)) * scale + rng.normal(size=5), jnp.float32)
    w = np.asarray(standardize_kernel(kernel, eps=0.0), np.float64)
    # float32: an offset up to ~100x the spread costs ~1e-5 (in units of the spread)
    np.testing.assert_allclose(w.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(w.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)


@pytest.mark.parametrize("scaled", [False, True])
def test_wsconv_convolves_with_its_standardized_kernel(scaled: bool) -> None:
    """WSConv's output is the convolution with its effective kernel: zero mean and unit
    variance per output channel (times ``gain / sqrt(fan_in)`` when scaled)."""
    conv = WSConv(5, (3, 3), scaled=scaled, eps=0.0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 2)), jnp.float32)
    variables = conv.init(jax.random.key(0), x)
    params = variables["params"]
    gain = params.get("gain")
    assert (gain is not None) == scaled
    if scaled:  # a learned gain other than 1 must show in the kernel
        params = {**params, "gain": jnp.arange(1.0, 6.0)}
    kernel = ws_kernel(params["kernel"], params.get("gain"), eps=0.0)
    unscaled = np.asarray(kernel, np.float64)
    if scaled:
        unscaled = unscaled * np.sqrt(3 * 3 * 2) / np.arange(1.0, 6.0)
    np.testing.assert_allclose(unscaled.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(unscaled.var(axis=(0, 1, 2)), 1.0, rtol=1e-4)
    want = jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    got = conv.apply({"params": params}, x)
    np.testing.assert_allclose(got, want + params["bias"], rtol=1e-5, atol=1e-5)


def test_norm_choices_are_checked() -> None:
    with pytest.raises(ValueError, match="valid norms"):
        SeedCNN(norm="instance")
    with pytest.raises(ValueError, match="do not divide"):
        init_shapes(SeedCNN(widths=(48,), norm="group"), SAMPLE_X)  # min(32, 48) = 32
    with pytest.raises(ValueError, match="normalizes every value to zero"):
        init_shapes(DigitModel(conv_widths=(4,), fc_widths=(8,), norm="group"), SAMPLE_X)


@pytest.mark.parametrize("norm", NORMS)
def test_registry_passes_config_model_norm(norm: str) -> None:
    from experiments import registry
    from experiments.configs import base

    config = base.get_config()
    assert config.model.norm == "batch"
    config.model.norm = norm
    for name in ("seed_cnn", "digit_model"):
        config.model.name = name
        assert registry.build_model(config, 10).norm == norm
    legacy = ml_collections.ConfigDict({"name": "seed_cnn", "widths": (4,), "hidden": 8})
    legacy.momentum = 0.9  # a config without the norm field builds BatchNorm
    assert registry.MODELS["seed_cnn"](legacy, 10, (8, 8, 1), 0).norm == "batch"
