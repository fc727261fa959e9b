"""The reshape max pooling the models use is nn.max_pool's 2x2/stride-2/SAME pooling."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bn.models import max_pool_2x2


def flax_pool(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (5, 6), (1, 3)])
def test_forward_and_gradient_equal_flax_max_pool(hw) -> None:
    x = jnp.asarray(np.random.default_rng(sum(hw)).normal(size=(3, *hw, 4)), jnp.float32)
    np.testing.assert_array_equal(max_pool_2x2(x), flax_pool(x))
    g = jnp.asarray(np.random.default_rng(1).normal(size=flax_pool(x).shape), jnp.float32)
    ours = jax.vjp(max_pool_2x2, x)[1](g)[0]
    theirs = jax.vjp(flax_pool, x)[1](g)[0]
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("hw", [(8, 8), (7, 7), (5, 6)])
def test_ties_send_the_gradient_to_the_first_maximum_like_select_and_scatter(hw) -> None:
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, (2, *hw, 3)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(1).normal(size=flax_pool(x).shape), jnp.float32)
    np.testing.assert_array_equal(jax.vjp(max_pool_2x2, x)[1](g)[0], jax.vjp(flax_pool, x)[1](g)[0])
    ones = jnp.ones((1, 2, 2, 1))  # one window, all tied: the first position gets it all
    np.testing.assert_array_equal(
        jax.grad(lambda x: max_pool_2x2(x).sum())(ones).ravel(), [1, 0, 0, 0]
    )


def test_vmapped_gradient_equals_per_example_gradients() -> None:
    x = jnp.asarray(np.random.default_rng(2).integers(0, 2, (3, 2, 6, 5, 2)), jnp.float32)
    loss = lambda x: (max_pool_2x2(x) ** 2).sum()  # noqa: E731
    batched = jax.vmap(jax.grad(loss))(x)
    np.testing.assert_array_equal(batched, jnp.stack([jax.grad(loss)(xi) for xi in x]))
