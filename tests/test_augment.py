"""fedjax_bn.data.augment: on-device crop/flip augmentations, chain, normalize, check_augment."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedjax_bn.data import augment as A


def _images(shape: tuple[int, ...], dtype=np.uint8, seed: int = 0) -> np.ndarray:
    """Distinct-valued images (so a window match is unambiguous)."""
    x = np.random.default_rng(seed).permutation(np.prod(shape)) % 250 + 1
    return x.reshape(shape).astype(dtype)


def _windows(x_HWC: np.ndarray, pad: int) -> list[np.ndarray]:
    """Every HxW window of the zero-padded example, by brute force."""
    h, w, _ = x_HWC.shape
    x_pad = np.pad(x_HWC, ((pad, pad), (pad, pad), (0, 0)))
    return [x_pad[i : i + h, j : j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]


def test_crop_pad_zero_is_identity():
    x = _images((4, 5, 6, 3))
    out = A.random_crop(0)(jax.random.key(1), jnp.asarray(x))
    np.testing.assert_array_equal(out, x)


@given(pad=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_crop_is_a_window_of_padded_input(pad: int, seed: int):
    x = _images((6, 4, 5, 2), seed=seed % 97)
    out = np.asarray(A.random_crop(pad)(jax.random.key(seed), jnp.asarray(x)))
    for b in range(x.shape[0]):
        assert any(np.array_equal(out[b], win) for win in _windows(x[b], pad)), b


def test_crop_offsets_are_independent_per_example():
    x = np.broadcast_to(_images((1, 4, 4, 1)), (64, 4, 4, 1))
    out = np.asarray(A.random_crop(2)(jax.random.key(0), jnp.asarray(x)))
    assert len({o.tobytes() for o in out}) > 1


def test_flip_is_identity_or_mirror_and_both_occur():
    x = _images((64, 3, 5, 2))
    out = np.asarray(A.random_flip()(jax.random.key(3), jnp.asarray(x)))
    same = [np.array_equal(o, xi) for o, xi in zip(out, x, strict=True)]
    mirrored = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x, strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True))
    assert any(same) and any(mirrored)


def test_chain_gives_each_member_its_own_key():
    seen: list[jax.Array] = []

    def record(key: jax.Array, x: jax.Array) -> jax.Array:
        seen.append(jax.random.key_data(key))
        return x

    key = jax.random.key(5)
    x = jnp.zeros((2, 3, 3, 1))
    np.testing.assert_array_equal(A.chain(record, record, record)(key, x), x)
    assert len(seen) == 3
    datas = [np.asarray(s).tobytes() for s in seen]
    assert len(set(datas)) == 3
    assert np.asarray(jax.random.key_data(key)).tobytes() not in datas


def test_chain_applies_in_order():
    add = lambda k, x: x + 1  # noqa: E731
    dbl = lambda k, x: x * 2  # noqa: E731
    x = jnp.ones((1, 1, 1, 1))
    assert float(A.chain(add, dbl)(jax.random.key(0), x).squeeze()) == 4.0
    assert float(A.chain(dbl, add)(jax.random.key(0), x).squeeze()) == 3.0


AUGMENTS = {
    "crop": A.random_crop(),
    "flip": A.random_flip(),
    "cifar": A.cifar_standard(),
}


@pytest.mark.parametrize("name", sorted(AUGMENTS))
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_shape_dtype_kept_and_jittable(name: str, dtype):
    fn = AUGMENTS[name]
    x = jnp.asarray(_images((8, 8, 8, 3), dtype))
    A.check_augment(fn, x)
    eager = fn(jax.random.key(0), x)
    jitted = jax.jit(fn)(jax.random.key(0), x)
    assert eager.shape == x.shape and eager.dtype == x.dtype
    assert jitted.shape == x.shape and jitted.dtype == x.dtype
    np.testing.assert_array_equal(eager, jitted)


@pytest.mark.parametrize("name", sorted(AUGMENTS))
def test_same_key_same_output_different_key_different_output(name: str):
    fn = jax.jit(AUGMENTS[name])
    x = jnp.asarray(_images((32, 8, 8, 3)))
    a = fn(jax.random.key(0), x)
    np.testing.assert_array_equal(a, fn(jax.random.key(0), x))
    assert not np.array_equal(a, fn(jax.random.key(1), x))


def test_check_augment_raises_on_shape_change():
    x = jax.ShapeDtypeStruct((4, 8, 8, 3), jnp.uint8)
    with pytest.raises(ValueError, match="same shape and dtype") as err:
        A.check_augment(lambda k, x: x[:, :6, :6], x)
    assert "(4, 8, 8, 3)" in str(err.value) and "(4, 6, 6, 3)" in str(err.value)


def test_check_augment_raises_on_dtype_change():
    x = jnp.zeros((4, 8, 8, 3), jnp.uint8)
    with pytest.raises(ValueError, match="same shape and dtype") as err:
        A.check_augment(lambda k, x: x.astype(jnp.float32) / 255.0, x)
    assert "uint8" in str(err.value) and "float32" in str(err.value)


def test_check_augment_accepts_valid():
    A.check_augment(A.cifar_standard(), jnp.zeros((2, 32, 32, 3), jnp.uint8))


@pytest.mark.parametrize(
    ("mean", "std"), [(A.CIFAR10_MEAN, A.CIFAR10_STD), (A.CIFAR100_MEAN, A.CIFAR100_STD)]
)
def test_normalize_of_mean_image_is_zero(mean, std):
    norm = A.normalize(mean, std)
    x = jnp.broadcast_to(jnp.asarray(mean, jnp.float32), (2, 4, 4, 3))
    out = norm(x)
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, 0.0, atol=1e-6)


def test_normalize_scales_integer_images():
    norm = A.normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    x = jnp.array([0, 255], jnp.uint8).reshape(2, 1, 1, 1) * jnp.ones((1, 1, 1, 3), jnp.uint8)
    out = norm(x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out[:, 0, 0, 0], [-1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(norm(x.astype(jnp.float32) / 255.0), out, atol=1e-6)


def test_normalize_rejects_bad_stats():
    with pytest.raises(ValueError):
        A.normalize((0.5, 0.5), (0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        A.normalize((0.5,), (0.0,))
