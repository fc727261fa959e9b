"""ResNet-18 written as a Flax user writes it (fedjax_bn.resnet): size, modes, default mode."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NUM_CLASSES, make_clients

import fedjax_bn as fb
from fedjax_bn.resnet import ResNet, ResNet18


def expected_resnet18_params(num_classes: int, cin: int = 3, f: int = 64) -> int:
    """Parameter count from the architecture: bias-free convs, BN scale+bias, a Dense head."""

    def conv(k: int, c_in: int, c_out: int) -> int:
        return k * k * c_in * c_out

    def bn(c: int) -> int:
        return 2 * c

    total = conv(3, cin, f) + bn(f)  # CIFAR stem
    c_in = f
    for i, blocks in enumerate((2, 2, 2, 2)):
        w = f * 2**i
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            total += conv(3, c_in, w) + bn(w) + conv(3, w, w) + bn(w)
            if stride != 1 or c_in != w:  # projection shortcut
                total += conv(1, c_in, w) + bn(w)
            c_in = w
    return total + c_in * num_classes + num_classes  # Dense head


def count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def test_resnet18_parameter_count():
    model = ResNet18(num_classes=10)
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    shapes = jax.eval_shape(lambda k: model.init(k, x, train=False), jax.random.key(0))
    assert expected_resnet18_params(10) == 11_173_962  # the well-known CIFAR ResNet-18 size
    assert count(shapes["params"]) == expected_resnet18_params(10)
    # BN running mean and var: one of each per BN scale (half of the BN params).
    bn_params = sum(
        int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])
        if path[-1].key == "scale"
    )
    assert count(shapes["batch_stats"]) == 2 * bn_params
    # The ImageNet stem differs only in its first kernel: 7x7 instead of 3x3.
    imagenet = ResNet18(num_classes=10, cifar_stem=False)
    out, shapes = jax.eval_shape(
        lambda k: imagenet.init_with_output(k, x, train=False), jax.random.key(0)
    )
    assert out.shape == (1, 10)
    assert count(shapes["params"]) == expected_resnet18_params(10) + (49 - 9) * 3 * 64


@pytest.fixture(scope="module")
def tiny():
    """A 4-filter ResNet-18, its variables and a uint8 batch; one jitted run of each mode."""
    model = ResNet18(num_classes=5, num_filters=4)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)), jnp.uint8)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))

    @jax.jit
    def run(variables, x):
        train = model.apply(variables, x, train=True, mutable=["batch_stats"])
        default = model.apply(variables, x, mutable=["batch_stats"])
        eval_ = model.apply(variables, x, train=False, mutable=["batch_stats"])
        return train, default, eval_

    return variables, run(variables, x)


def test_tiny_train_and_eval_modes(tiny):
    variables, ((y_train, s_train), _, (y_eval, s_eval)) = tiny
    assert y_train.shape == (2, 5) and y_eval.shape == (2, 5)
    assert np.all(np.isfinite(y_train)) and np.all(np.isfinite(y_eval))
    old = jax.tree.leaves(variables["batch_stats"])
    # Train mode moves every BN's running statistics; eval mode leaves them exactly as they were.
    for a, b in zip(old, jax.tree.leaves(s_train["batch_stats"]), strict=True):
        assert not np.allclose(a, b)
    for a, b in zip(old, jax.tree.leaves(s_eval["batch_stats"]), strict=True):
        np.testing.assert_array_equal(a, b)


def test_train_is_the_default(tiny):
    train = inspect.signature(ResNet.__call__).parameters["train"]
    assert train.default is True
    assert train.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    variables, ((y_train, s_train), (y_default, s_default), _) = tiny
    np.testing.assert_array_equal(y_default, y_train)
    for a, b, c in zip(
        jax.tree.leaves(variables["batch_stats"]),
        jax.tree.leaves(s_default["batch_stats"]),
        jax.tree.leaves(s_train["batch_stats"]),
        strict=True,
    ):
        assert not np.allclose(a, b)
        np.testing.assert_array_equal(b, c)


@pytest.mark.parametrize(
    "factory",
    [fb.fedavg, fb.fedbn, lambda m, tx: fb.scaffold(m, tx, lr=0.05)],
    ids=["fedavg", "fedbn", "scaffold"],
)
def test_resnet18_as_written_trains_federated(factory) -> None:
    """The flax-examples ResNet-18 (default ``train``, no ``mask``) through a federated round:
    BN runs on batch statistics (running statistics move), padding is masked for it, and the
    round is finite. Tiny: 4 filters, 8x8 images, one step per client (one program)."""
    data = make_clients(0, (5, 11, 3))
    alg = factory(fb.ResNet18(num_classes=NUM_CLASSES, num_filters=2), optax.sgd(0.05))
    state = alg.init(jax.random.key(0), data.x[0, :1], 3)
    state, result = fb.make_round(alg, executor="vmap", batch_size=16)(
        state, data, jax.random.key(1)
    )
    parts = fb.algorithms.model_parts(state)
    stats = parts.local.get("batch_stats") or parts.pooled["batch_stats"]
    assert all(np.any(np.asarray(s) != 0) for s in jax.tree.leaves(stats) if s.ndim)
    assert np.all(np.isfinite(np.asarray(result.loss)))
