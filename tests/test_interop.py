"""PyTorch interop: torch-layout weights give the torch forward pass's logits, and round-trip.

The reference is a NumPy re-implementation of the torch forward pass (NCHW, OIHW kernels,
flatten over (C, H, W), ``x @ W.T + b``), driven by the same layer spec that builds the
state_dict, so no torch import is needed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedjax_bn.interop import from_torch, to_torch
from fedjax_bn.models import DigitModel, SeedCNN

EPS = 1e-5  # nn.BatchNorm's default epsilon, as torch's

Spec = list[tuple[Any, ...]]


def seed_spec(c_in: int, h: int, w: int) -> Spec:
    """torch layers of SeedCNN(num_classes=3, widths=(4,), hidden=5), nn.Sequential-style."""
    return [
        ("conv", "features.0", c_in, 4, 3),
        ("bn", "features.1", 4),
        ("relu",),
        ("pool",),
        ("flatten",),
        ("linear", "classifier.0", 4 * (h // 2) * (w // 2), 5),
        ("relu",),
        ("linear", "classifier.2", 5, 3),
    ]


def digit_spec() -> Spec:
    """torch layers of FedBN's DigitModel with widths (2, 3, 4) / (5, 6), on 8x8x1 inputs."""
    spec: Spec = []
    for i, (c_in, c_out) in enumerate([(1, 2), (2, 3), (3, 4)], start=1):
        spec += [("conv", f"conv{i}", c_in, c_out, 5), ("bn", f"bn{i}", c_out), ("relu",)]
        spec += [("pool",)] if i < 3 else [("flatten",)]
    for i, (n_in, n_out) in enumerate([(16, 5), (5, 6)], start=1):
        spec += [("linear", f"fc{i}", n_in, n_out), ("bn", f"bn{i + 3}", n_out), ("relu",)]
    return spec + [("linear", "fc3", 6, 3)]


def make_state_dict(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    """Random torch-layout float32 weights, with non-trivial BN running statistics."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> np.ndarray:
        return rng.normal(size=shape).astype(np.float32)

    sd: dict[str, np.ndarray] = {}
    for op, *args in spec:
        if op == "conv":
            name, c_in, c_out, k = args
            sd[f"{name}.weight"] = normal(c_out, c_in, k, k) * 0.5
            sd[f"{name}.bias"] = normal(c_out)
        elif op == "linear":
            name, n_in, n_out = args
            sd[f"{name}.weight"] = normal(n_out, n_in) * 0.5
            sd[f"{name}.bias"] = normal(n_out)
        elif op == "bn":
            name, c = args
            sd[f"{name}.weight"] = 1.0 + normal(c) * 0.3
            sd[f"{name}.bias"] = normal(c)
            sd[f"{name}.running_mean"] = normal(c)
            sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
            sd[f"{name}.num_batches_tracked"] = np.array(7, np.int64)
    return sd


def conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """NCHW conv, OIHW kernel, stride 1, 'same' zero padding (odd k), as an einsum over patches."""
    k = w.shape[-1]
    h, wd = x.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    patches = np.stack([[xp[:, :, i : i + h, j : j + wd] for j in range(k)] for i in range(k)])
    return np.einsum("ijnchw,ocij->nohw", patches, w) + b[None, :, None, None]


def torch_forward(spec: Spec, sd: dict[str, np.ndarray], x_nchw: np.ndarray) -> np.ndarray:
    """The torch model's eval-mode forward pass, in float64 NumPy."""
    p = {k: v.astype(np.float64) for k, v in sd.items()}
    x = x_nchw.astype(np.float64)
    for op, *args in spec:
        if op == "conv":
            x = conv2d(x, p[f"{args[0]}.weight"], p[f"{args[0]}.bias"])
        elif op == "bn":
            shape = (1, -1) + (1,) * (x.ndim - 2)
            m, v, w, b = (
                p[f"{args[0]}.{s}"].reshape(shape)
                for s in ("running_mean", "running_var", "weight", "bias")
            )
            x = (x - m) / np.sqrt(v + EPS) * w + b
        elif op == "relu":
            x = np.maximum(x, 0.0)
        elif op == "pool":
            n, c, h, w = x.shape
            x = x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))
        elif op == "flatten":
            x = x.reshape(x.shape[0], -1)
        elif op == "linear":
            x = x @ p[f"{args[0]}.weight"].T + p[f"{args[0]}.bias"]
    return x


def check_logits(model: nn.Module, spec: Spec, sd: dict[str, np.ndarray], x: np.ndarray) -> None:
    variables = from_torch(model, sd, sample_x=jnp.asarray(x[:1]))
    logits = model.apply(variables, jnp.asarray(x), train=False)
    assert logits.dtype == jnp.float32
    expected = torch_forward(spec, sd, x.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5, atol=1e-5)


def seed_model() -> SeedCNN:
    return SeedCNN(num_classes=3, widths=(4,), hidden=5)


def images(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed + 1000).normal(size=shape).astype(np.float32)


@given(st.sampled_from([(6, 6), (6, 4), (2, 8)]), st.integers(0, 2**16))
def test_seed_cnn_logits_match_torch_forward(hw: tuple[int, int], seed: int) -> None:
    h, w = hw  # non-square maps catch an (H, W) swap in the flatten permutation
    check_logits(
        seed_model(),
        seed_spec(2, h, w),
        make_state_dict(seed_spec(2, h, w), seed),
        images(seed, (3, h, w, 2)),
    )


def test_digit_model_logits_match_torch_forward() -> None:
    """5x5 convs, two pools, and BatchNorm1d after the linear layers, with FedBN's names."""
    model = DigitModel(num_classes=3, conv_widths=(2, 3, 4), fc_widths=(5, 6))
    check_logits(model, digit_spec(), make_state_dict(digit_spec(), 0), images(0, (3, 8, 8, 1)))


class TopLevelPool(nn.Module):
    """conv + BN + ReLU + pool + flatten + dense in one module: pooling outside any submodule,
    so the last module output (BN's) is larger than what the dense layer reads."""

    keep: int = 4  # channels kept (outside modules) before the flatten

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x)))
        x = nn.max_pool(x, (2, 2), strides=(2, 2))[..., : self.keep]
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize("hw", [(6, 6), (6, 4)])
def test_pooling_outside_modules(hw: tuple[int, int]) -> None:
    h, w = hw
    spec = [s for s in seed_spec(2, h, w) if s[0] != "linear"]
    spec.append(("linear", "classifier.0", 4 * (h // 2) * (w // 2), 3))
    check_logits(TopLevelPool(), spec, make_state_dict(spec, 3), images(3, (2, h, w, 2)))


def test_changed_channel_count_is_reported() -> None:
    with pytest.raises(ValueError, match=r"channels flax layer 'Dense_0'.*27 inputs.*4 channels"):
        from_torch(TopLevelPool(keep=3), {}, sample_x=jnp.zeros((1, 6, 6, 2)))


def test_round_trip() -> None:
    model, x = seed_model(), jnp.zeros((1, 6, 4, 2))
    sd = make_state_dict(seed_spec(2, 6, 4), 1)
    variables = from_torch(model, sd, sample_x=x)
    back = to_torch(model, variables, sample_x=x, keys_like=sd)
    assert list(back) == list(sd)
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            assert back[key].dtype == np.int64 and back[key].shape == () and back[key] == 0
        else:
            assert back[key].dtype == value.dtype
            np.testing.assert_array_equal(back[key], value)
    # jax.tree operations sort dict keys (BatchNorm_0 before Conv_0): the result is the same.
    sorted_back = to_torch(model, jax.tree.map(np.asarray, variables), sample_x=x, keys_like=sd)
    assert all(np.array_equal(sorted_back[k], back[k]) for k in sd)
    # Without keys_like: index names, and back again to the same variables.
    indexed = to_torch(model, variables, sample_x=x)
    assert list(indexed)[:6] == [
        f"{i}.{s}"
        for i, s in [
            (0, "weight"),
            (0, "bias"),
            (1, "weight"),
            (1, "bias"),
            (1, "running_mean"),
            (1, "running_var"),
        ]
    ]
    again = from_torch(model, indexed, sample_x=x)
    assert jax.tree.structure(again) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(variables), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture
def seed_sd() -> dict[str, np.ndarray]:
    return make_state_dict(seed_spec(2, 6, 6), 2)


def convert(sd: dict[str, np.ndarray]) -> Any:
    return from_torch(seed_model(), sd, sample_x=jnp.zeros((1, 6, 6, 2)))


def test_wrong_conv_shape_names_the_key(seed_sd: dict[str, np.ndarray]) -> None:
    seed_sd["features.0.weight"] = np.zeros((4, 2, 5, 5), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'features\.0\.weight' has shape \(4, 2, 5, 5\), "
        r"expected \(4, 2, 3, 3\)",
    ):
        convert(seed_sd)


def test_wrong_linear_shape_names_the_key(seed_sd: dict[str, np.ndarray]) -> None:
    seed_sd["classifier.0.weight"] = np.zeros((5, 35), np.float32)
    with pytest.raises(
        ValueError,
        match=r"'classifier\.0\.weight' has shape \(5, 35\), "
        r"expected \(5, 36\)",
    ):
        convert(seed_sd)


def test_missing_layer_is_listed(seed_sd: dict[str, np.ndarray]) -> None:
    del seed_sd["classifier.2.weight"], seed_sd["classifier.2.bias"]
    with pytest.raises(
        ValueError,
        match=r"unmatched torch layers: \[\], "
        r"unmatched flax layers: \['Dense_1'\]",
    ):
        convert(seed_sd)


def test_extra_layer_is_listed(seed_sd: dict[str, np.ndarray]) -> None:
    seed_sd["classifier.4.weight"] = np.zeros((3, 3), np.float32)
    seed_sd["classifier.4.bias"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError, match=r"unmatched torch layers: \['classifier\.4'\]"):
        convert(seed_sd)


def test_layer_kind_mismatch_names_both_sides(seed_sd: dict[str, np.ndarray]) -> None:
    seed_sd = {k: v for k, v in seed_sd.items() if not k.startswith("features.1")}
    with pytest.raises(
        ValueError,
        match=r"'classifier\.0' \(linear\) lines up with flax layer "
        r"'ConvBNReLU_0/BatchNorm_0' \(bn\)",
    ):
        convert(seed_sd)


def test_missing_and_unknown_keys_are_named(seed_sd: dict[str, np.ndarray]) -> None:
    with pytest.raises(ValueError, match=r"missing torch key 'features\.1\.running_var'"):
        convert({k: v for k, v in seed_sd.items() if k != "features.1.running_var"})
    with pytest.raises(ValueError, match=r"torch key 'features\.0\.weight_g' has no flax"):
        convert({**seed_sd, "features.0.weight_g": np.zeros((4, 1, 1, 1), np.float32)})


COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, d, **_: (
        COMPILES.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
    )
)


def test_full_state_dict_compiles_nothing() -> None:
    """Shapes come from jax.eval_shape and every leaf from the dict: no program compiles."""
    model, x = seed_model(), np.zeros((1, 6, 6, 2), np.float32)
    sd = make_state_dict(seed_spec(2, 6, 6), 3)
    before = len(COMPILES)
    from_torch(model, sd, sample_x=x)
    assert len(COMPILES) == before


class WithCounter(nn.Module):
    """A Dense layer and a variable of another collection, which torch's dict does not hold."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        self.variable("counters", "calls", lambda: jnp.full((), 3.0))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def test_leaves_the_dict_lacks_keep_their_init_values() -> None:
    sd = {
        "0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
        "0.bias": np.ones(3, np.float32),
    }
    variables = from_torch(WithCounter(), sd, sample_x=np.zeros((1, 2, 2, 1), np.float32))
    assert float(variables["counters"]["calls"]) == 3.0
    np.testing.assert_array_equal(variables["params"]["Dense_0"]["kernel"], sd["0.weight"].T)
    np.testing.assert_array_equal(variables["params"]["Dense_0"]["bias"], sd["0.bias"])
