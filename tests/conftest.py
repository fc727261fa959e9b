"""Shared test set-up: hypothesis profiles, tiny models and tiny federated data.

Profiles: ``ci`` (deterministic, few examples; the default and whenever ``CI`` is set) and
``dev`` (more, random examples) with ``HYPOTHESIS_PROFILE=dev``.
"""

from __future__ import annotations

import gc
import os

# Tests compile many tiny programs and run each briefly: XLA:CPU's backend optimizations cost
# more compile time (~40% of this suite's) than they save. Set XLA_FLAGS yourself to override.
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")
# Hermetic tests: no persistent compilation cache unless a test turns one on in a tmp dir.
os.environ.setdefault("FEDJAX_BN_COMPILATION_CACHE", "0")
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, settings

from fedjax_bn.data import ClientArrays
from fedjax_bn.models import SeedCNN

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=10,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
settings.load_profile("dev" if os.environ.get("HYPOTHESIS_PROFILE") == "dev" else "ci")

IMAGE_SHAPE = (8, 8, 1)
NUM_CLASSES = 3


def tiny_cnn() -> SeedCNN:
    """The smallest SeedCNN worth testing: one conv+BN block, an 8-wide hidden layer."""
    return SeedCNN(num_classes=NUM_CLASSES, widths=(4,), hidden=8)


def sgd() -> optax.GradientTransformation:
    """Plain SGD: updates are exactly ``-lr * grad``, easy to reason about."""
    return optax.sgd(0.1)


class CountedBN(nn.Module):
    """BatchNorm plus an int32 ``num_batches_tracked`` counter in ``batch_stats`` (as in torch)."""

    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        count = self.variable("batch_stats", "num_batches_tracked", jnp.zeros, (), jnp.int32)
        if train and not self.is_initializing():
            count.value = count.value + 1
        bn_mask = None if mask is None else mask.reshape(mask.shape + (1,) * (x.ndim - 1))
        return nn.BatchNorm(use_running_average=not train, momentum=self.momentum, name="bn")(
            x, mask=bn_mask
        )


class CounterModel(nn.Module):
    """dense + counted BN + ReLU + dense: an integer leaf among the BN statistics, and cheap to
    compile (no convolutions), for the many jitted rounds of the algorithm tests."""

    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = nn.Dense(4)(x.reshape((x.shape[0], -1)).astype(jnp.float32))
        x = nn.relu(CountedBN()(x, train=train, mask=mask))
        return nn.Dense(self.num_classes)(x)


def make_clients(seed: int, sizes: tuple[int, ...], n_max: int | None = None) -> ClientArrays:
    """Random float images and labels for clients of the given sizes, zero-padded to n_max.

    Each client's images get their own offset and scale, so clients differ in feature statistics.
    """
    n_max = max(max(sizes), 1) if n_max is None else n_max
    c = len(sizes)
    shift = normal(seed, (c, 1, 1, 1, 1), salt=1) * 2.0
    x = normal(seed, (c, n_max, *IMAGE_SHAPE), salt=2) * (1.0 + np.abs(shift)) + shift
    y = randint(seed, (c, n_max), NUM_CLASSES, salt=3)
    valid = np.arange(n_max)[None, :] < np.asarray(sizes)[:, None]
    x = np.where(valid[..., None, None, None], x, 0.0).astype(np.float32)
    y = np.where(valid, y, 0).astype(np.int32)
    return ClientArrays(x=jnp.asarray(x), y=jnp.asarray(y), n=jnp.asarray(sizes, jnp.int32))


_POOL = 4096


def normal(seed: int, shape: tuple[int, ...], salt: int = 0) -> np.ndarray:
    """Standard normal host array from ``jax.random.key(seed)`` (folded with ``salt``).

    Always draws one fixed-size vector and reshapes a prefix, so no shape triggers a compile.
    """
    size = int(np.prod(shape))
    pool = max(_POOL, 1 << (size - 1).bit_length())
    key = jax.random.fold_in(jax.random.key(seed), salt)
    return np.asarray(jax.random.normal(key, (pool,)))[:size].reshape(shape)


def randint(seed: int, shape: tuple[int, ...], high: int, salt: int = 0) -> np.ndarray:
    """Uniform int32 host array in [0, high) from ``jax.random.key(seed)``; see :func:`normal`."""
    size = int(np.prod(shape))
    pool = max(_POOL, 1 << (size - 1).bit_length())
    key = jax.random.fold_in(jax.random.key(seed), salt)
    return np.asarray(jax.random.randint(key, (pool,), 0, 1 << 20))[:size].reshape(shape) % high


def init_shapes(model: nn.Module, x: jax.Array) -> dict[str, Any]:
    """The model's variables as ShapeDtypeStructs: structure without compiling anything."""
    return dict(jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0)))


def random_like(tree: Any, seed: int) -> Any:
    """Host random values in the shape and dtype of every leaf (no compilation)."""
    rng = np.random.default_rng(seed)

    def fill(leaf: Any) -> np.ndarray:
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return rng.integers(0, 100, leaf.shape).astype(leaf.dtype)
        return rng.normal(size=leaf.shape).astype(leaf.dtype)

    return jax.tree.map(fill, tree)


def assert_trees_close(a: Any, b: Any, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same structure, same dtypes, values allclose."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert jnp.result_type(x) == jnp.result_type(y)
        np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        )


def assert_trees_equal(a: Any, b: Any) -> None:
    """Same structure, same dtypes, bitwise-equal values."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert jnp.result_type(x) == jnp.result_type(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="session")
def sample_x() -> jax.Array:
    """One example image batch for ``init``."""
    return jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs() -> Any:
    """After each test module, drop jax's caches of traced and compiled programs: every XLA:CPU
    executable holds memory mappings of its own, and one process compiling the whole suite's
    thousands of programs approaches the kernel's per-process map limit (``vm.max_map_count``),
    where XLA's compiler crashed (a segfault, once an abort, late in the suite)."""
    yield
    jax.clear_caches()
    gc.collect()
