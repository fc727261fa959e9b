"""Tests for AdaBN (fedjax_bn.adapt): after ``adapt_bn`` a one-BN-layer model's running
statistics are the moments of that layer's inputs over the given data, whatever the momentum;
nothing else changes."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CounterModel, assert_trees_equal, make_clients, sgd

import fedjax_bn as fb
from fedjax_bn.adapt import adapt_bn, adapt_variables
from fedjax_bn.tree import flatten

X = np.asarray(make_clients(3, (13,)).x[0])  # 13 examples: batches of 5, 5 and a partial 3


class InputBN(nn.Module):
    """BatchNorm straight on the flattened input (momentum 0.99), then a dense layer."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = x.reshape((x.shape[0], -1))
        m = None if mask is None else mask[:, None]
        x = nn.BatchNorm(use_running_average=not train, momentum=0.99)(x, mask=m)
        return nn.Dense(3)(x)


def stats(variables: dict) -> dict:
    return {"/".join(p): np.asarray(v) for p, v in flatten(variables["batch_stats"]).items()}


def without_stats(variables: dict) -> dict:
    return {k: v for k, v in variables.items() if k != "batch_stats"}


def test_adapt_bn_sets_the_input_moments_of_the_data() -> None:
    alg = fb.fedavg(InputBN(), sgd())
    state = alg.init(jax.random.key(0), jnp.asarray(X[:1]), 2)
    got = adapt_bn(alg, state, X, batch_size=5)
    flat = X.reshape(len(X), -1).astype(np.float64)
    s = stats(got)
    np.testing.assert_allclose(s["BatchNorm_0/mean"], flat.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s["BatchNorm_0/var"], flat.var(0), rtol=1e-4, atol=1e-5)
    before = fb.global_variables(alg, state, jnp.ones(2))
    assert_trees_equal(without_stats(got), without_stats(before))
    one_batch = adapt_bn(alg, state, X, batch_size=64)  # batching does not change the moments
    for k, v in stats(one_batch).items():
        np.testing.assert_allclose(v, s[k], rtol=1e-5, atol=1e-6)


def test_adapt_bn_of_a_client_model_after_a_dense_layer_keeps_counters() -> None:
    alg = fb.fedbn(CounterModel(), sgd())
    state = alg.init(jax.random.key(1), jnp.asarray(X[:1]), 2)
    with pytest.raises(ValueError, match="client=c"):
        adapt_bn(alg, state, X)
    got = adapt_bn(alg, state, X, client=1, batch_size=4)
    dense = got["params"]["Dense_0"]
    h = X.reshape(len(X), -1).astype(np.float64) @ np.asarray(dense["kernel"], np.float64)
    h = h + np.asarray(dense["bias"], np.float64)
    s = stats(got)
    np.testing.assert_allclose(s["CountedBN_0/bn/mean"], h.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s["CountedBN_0/bn/var"], h.var(0), rtol=1e-4, atol=1e-5)
    before = fb.algorithms.client_variables(state, 1)
    np.testing.assert_array_equal(
        s["CountedBN_0/num_batches_tracked"], stats(before)["CountedBN_0/num_batches_tracked"]
    )
    assert_trees_equal(without_stats(got), without_stats(before))


def test_adapt_variables_edge_cases() -> None:
    class NoBN(nn.Module):
        @nn.compact
        def __call__(self, x, *, train: bool, mask=None):
            return nn.Dense(3)(x.reshape((x.shape[0], -1)))

    variables = NoBN().init(jax.random.key(0), jnp.asarray(X[:1]), train=False)
    assert adapt_variables(NoBN(), variables, X) is variables
    with pytest.raises(ValueError, match="batch_size"):
        adapt_variables(NoBN(), variables, X, batch_size=0)
    with pytest.raises(ValueError, match="one example"):
        adapt_variables(NoBN(), variables, X[:0])
