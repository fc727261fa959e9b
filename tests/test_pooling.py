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
    np.testing.assert_array_equal(ours, theirs)  # continuous inputs: no ties


def test_gradient_of_relu_zeros_is_zero_whatever_the_tie_rule() -> None:
    x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(2.0)
    grad = jax.grad(lambda x: max_pool_2x2(jax.nn.relu(x)).sum())(x)
    want = jax.grad(lambda x: flax_pool(jax.nn.relu(x)).sum())(x)
    np.testing.assert_array_equal(grad, want)
