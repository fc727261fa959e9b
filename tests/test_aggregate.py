"""Tests for fedjax_bn.aggregate: weighted means and pooled BatchNorm statistics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, normal
from hypothesis import assume, given
from hypothesis import strategies as st

from fedjax_bn.aggregate import normalized_weights, pooled_moments, weighted_mean
from fedjax_bn.policy import pool_batch_stats

# A few leaf shapes and client counts, so jit caches are reused across examples.
shapes = st.lists(st.sampled_from([(3,), (2, 3), (1, 1, 2)]), min_size=1, max_size=3)
seeds = st.integers(0, 2**31 - 1)
# Library functions are undecorated; the tests jit them once, as a caller would.
wmean = jax.jit(weighted_mean)
pool_stats = jax.jit(pool_batch_stats)
moments = jax.jit(pooled_moments)


@st.composite
def weights(draw: st.DrawFn, num_clients: int) -> np.ndarray:
    """Non-negative client weights with a positive total (some may be zero)."""
    w = draw(
        st.lists(
            st.one_of(st.just(0.0), st.floats(0.1, 100.0)),
            min_size=num_clients,
            max_size=num_clients,
        )
    )
    assume(sum(w) > 0)
    return np.asarray(w, np.float32)


def stacked_tree(seed: int, num_clients: int, leaf_shapes: list[tuple[int, ...]]) -> Any:
    """{'params': {'w0': [C, *s0], ...}, 'step': int32 [C]} with random floats."""
    params = {
        f"w{i}": jnp.asarray(normal(seed, (num_clients, *s), salt=i) * 3.0)
        for i, s in enumerate(leaf_shapes)
    }
    return {"params": params, "step": jnp.arange(num_clients, dtype=jnp.int32) + 7}


def server_of(stacked: Any) -> Any:
    """A server tree with the structure of one client (client 0's values, step set to 3)."""
    server = jax.tree.map(lambda x: np.asarray(x)[0], stacked)
    server["step"] = jnp.int32(3)
    return server


def numpy_mean(stacked: Any, w: np.ndarray) -> Any:
    """The weighted mean in float64 numpy, the reference."""
    w = np.asarray(w, np.float64) / np.sum(w)
    return jax.tree.map(lambda x: np.tensordot(w, np.asarray(x, np.float64), axes=1), stacked)


@given(c=st.integers(1, 5), leaf_shapes=shapes, seed=seeds, data=st.data())
def test_weighted_mean_matches_reference_and_keeps_integers(
    c: int, leaf_shapes: list[tuple[int, ...]], seed: int, data: st.DataObject
) -> None:
    """Float leaves == the float64 weighted mean; the int32 leaf keeps the server's value."""
    w = data.draw(weights(c))
    stacked = stacked_tree(seed, c, leaf_shapes)
    out = wmean(stacked, w, server_of(stacked))
    want = numpy_mean(stacked["params"], w)
    for name, leaf in out["params"].items():
        assert leaf.dtype == jnp.float32 and leaf.shape == stacked["params"][name].shape[1:]
        np.testing.assert_allclose(leaf, want[name], rtol=1e-5, atol=1e-5)
    assert out["step"].dtype == jnp.int32 and int(out["step"]) == 3


@given(c=st.integers(2, 5), leaf_shapes=shapes, seed=seeds, data=st.data())
def test_weighted_mean_ignores_client_order(
    c: int, leaf_shapes: list[tuple[int, ...]], seed: int, data: st.DataObject
) -> None:
    """Permuting clients (and their weights) changes nothing."""
    w = data.draw(weights(c))
    perm = np.asarray(data.draw(st.permutations(range(c))))
    stacked = stacked_tree(seed, c, leaf_shapes)
    server = server_of(stacked)
    permuted = jax.tree.map(lambda x: np.asarray(x)[perm], stacked)
    assert_trees_close(wmean(permuted, w[perm], server), wmean(stacked, w, server), atol=1e-5)


@given(
    c=st.integers(1, 5),
    leaf_shapes=shapes,
    seed=seeds,
    scale=st.floats(1e-3, 1e3),
    data=st.data(),
)
def test_weighted_mean_is_scale_invariant(
    c: int, leaf_shapes: list[tuple[int, ...]], seed: int, scale: float, data: st.DataObject
) -> None:
    """Weights w and k * w give the same mean."""
    w = data.draw(weights(c))
    stacked = stacked_tree(seed, c, leaf_shapes)
    server = server_of(stacked)
    assert_trees_close(
        wmean(stacked, w * np.float32(scale), server),
        wmean(stacked, w, server),
        atol=1e-5,
    )


@given(c=st.integers(1, 5), leaf_shapes=shapes, seed=seeds, data=st.data())
def test_identical_clients_give_back_the_model(
    c: int, leaf_shapes: list[tuple[int, ...]], seed: int, data: st.DataObject
) -> None:
    """C copies of one model average to that model, whatever the weights."""
    w = data.draw(weights(c))
    one = jax.tree.map(lambda x: np.asarray(x)[0], stacked_tree(seed, 1, leaf_shapes))
    copies = jax.tree.map(lambda x: np.broadcast_to(x, (c, *x.shape)), one)
    assert_trees_close(wmean(copies, w, one), one, rtol=1e-6, atol=1e-6)


@given(
    c=st.integers(1, 4),
    pad=st.integers(1, 3),
    leaf_shapes=shapes,
    seed=seeds,
    data=st.data(),
)
def test_zero_weight_clients_change_nothing(
    c: int, pad: int, leaf_shapes: list[tuple[int, ...]], seed: int, data: st.DataObject
) -> None:
    """Appending clients with weight zero (and arbitrary finite values) changes nothing."""
    w = data.draw(weights(c))
    stacked = stacked_tree(seed, c + pad, leaf_shapes)
    real = jax.tree.map(lambda x: np.asarray(x)[:c], stacked)
    padded_w = np.concatenate([w, np.zeros(pad, np.float32)])
    server = server_of(stacked)
    assert_trees_close(wmean(stacked, padded_w, server), wmean(real, w, server))


def test_weighted_mean_hand_computed() -> None:
    """weights (1, 3): mean of 0 and 4 is 3, of 2 and 6 is 5."""
    stacked = {"a": jnp.array([[0.0, 2.0], [4.0, 6.0]]), "n": jnp.array([5, 9], jnp.int32)}
    out = weighted_mean(stacked, jnp.array([1.0, 3.0]), {"a": jnp.zeros(2), "n": jnp.int32(2)})
    np.testing.assert_array_equal(out["a"], [3.0, 5.0])
    assert out["n"].dtype == jnp.int32 and int(out["n"]) == 2


@given(c=st.integers(1, 4), seed=seeds, data=st.data())
def test_mixed_dtype_tree(c: int, seed: int, data: st.DataObject) -> None:
    """bfloat16, float32 and int32 leaves in one tree: dtypes kept, floats averaged, ints kept."""
    w = data.draw(weights(c))
    stacked = {
        "bf16": jnp.asarray(normal(seed, (c, 5), salt=0), jnp.bfloat16),
        "f32": jnp.asarray(normal(seed, (c, 2, 3), salt=1)),
        "i32": jnp.full((c, 4), 11, jnp.int32),
    }
    server = {"bf16": stacked["bf16"][0], "f32": stacked["f32"][0], "i32": jnp.arange(4)}
    out = wmean(stacked, w, server)
    assert {k: v.dtype for k, v in out.items()} == {
        "bf16": jnp.bfloat16,
        "f32": jnp.float32,
        "i32": jnp.int32,
    }
    want = numpy_mean({k: stacked[k] for k in ("bf16", "f32")}, w)
    np.testing.assert_allclose(out["f32"], want["f32"], rtol=1e-5, atol=1e-5)
    # bf16 keeps 8 mantissa bits: the float32 mean rounded once.
    np.testing.assert_allclose(
        np.asarray(out["bf16"], np.float64), want["bf16"], rtol=1e-2, atol=1e-2
    )
    np.testing.assert_array_equal(out["i32"], np.arange(4))


def test_bad_weights_raise() -> None:
    """Zero total, negative or non-1-D weights raise a ValueError that says so."""
    stacked = {"a": jnp.ones((2, 3))}
    with pytest.raises(ValueError, match="Total client weight is zero"):
        weighted_mean(stacked, jnp.zeros(2), {"a": jnp.ones(3)})
    with pytest.raises(ValueError, match="Total client weight is zero"):
        pool_batch_stats({"m": {"mean": jnp.ones((2, 3)), "var": jnp.ones((2, 3))}}, [0, 0], None)
    with pytest.raises(ValueError, match="non-negative"):
        normalized_weights(jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="1-D"):
        normalized_weights(jnp.ones((2, 1)))


def test_mismatched_client_trees_raise_naming_the_leaf() -> None:
    """Missing, extra and mis-shaped client leaves raise a ValueError naming the leaf."""
    w = jnp.array([1.0, 2.0])
    server = {"params": {"a": jnp.ones(3), "b": jnp.ones(2)}}
    with pytest.raises(ValueError, match=r"missing \['params/b'\]"):
        weighted_mean({"params": {"a": jnp.ones((2, 3))}}, w, server)
    with pytest.raises(ValueError, match=r"unexpected \['params/c'\]"):
        weighted_mean(
            {"params": {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 2)), "c": jnp.ones((2,))}},
            w,
            server,
        )
    with pytest.raises(ValueError, match=r"params/a: .*shape \(2, 4\), expected \(2, 3\)"):
        weighted_mean({"params": {"a": jnp.ones((2, 4)), "b": jnp.ones((2, 2))}}, w, server)
    with pytest.raises(ValueError, match=r"params/b: .*shape \(3, 2\), expected \(2, 2\)"):
        weighted_mean({"params": {"a": jnp.ones((2, 3)), "b": jnp.ones((3, 2))}}, w, server)


@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    features=st.integers(1, 3),
    seed=seeds,
)
def test_pooled_moments_equal_moments_of_concatenated_data(
    sizes: list[int], features: int, seed: int
) -> None:
    """Pooled (mean, var) == (mean, var) of all clients' data concatenated."""
    parts = [
        normal(seed, (n, features), salt=2 * i).astype(np.float64) * (1 + i)
        + normal(seed, (features,), salt=2 * i + 1) * 3.0
        for i, n in enumerate(sizes)
    ]
    means = np.stack([p.mean(0) for p in parts]).astype(np.float32)
    variances = np.stack([p.var(0) for p in parts]).astype(np.float32)
    n = np.asarray(sizes, np.float32)
    all_data = np.concatenate(parts)
    for w in (n, n / n.sum()):  # counts or normalized weights
        mean, var = moments(means, variances, w)
        np.testing.assert_allclose(mean, all_data.mean(0), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(var, all_data.var(0), rtol=1e-4, atol=1e-4)
    # Law of total variance: pooled >= the naive weighted mean of variances.
    naive = np.tensordot(n / n.sum(), np.asarray(variances, np.float64), axes=1)
    assert np.all(np.asarray(var) >= naive - 1e-4)


def test_pooled_moments_hand_computed() -> None:
    """Two clients, {0, 0} and {4, 4, 4, 4, 4, 4}: union mean 3, variance 3 (naive: 0)."""
    mean, var = pooled_moments(jnp.array([0.0, 4.0]), jnp.array([0.0, 0.0]), jnp.array([2.0, 6.0]))
    np.testing.assert_allclose([mean, var], [3.0, 3.0], rtol=1e-6)


@given(c=st.integers(1, 4), seed=seeds, data=st.data())
def test_pool_batch_stats(c: int, seed: int, data: st.DataObject) -> None:
    """Every (mean, var) module pooled; other floats averaged; int counters keep server value."""
    w = data.draw(weights(c))
    stacked = {
        "a": {
            "bn": {
                "mean": jnp.asarray(normal(seed, (c, 3), salt=0)),
                "var": jnp.asarray(np.exp(normal(seed, (c, 3), salt=1))),
            }
        },
        "b": {
            "mean": jnp.asarray(normal(seed, (c, 2), salt=2), jnp.bfloat16),
            "var": jnp.asarray(np.exp(normal(seed, (c, 2), salt=3)), jnp.bfloat16),
            "num_batches_tracked": jnp.full((c,), 9, jnp.int32),
            "other": jnp.asarray(normal(seed, (c, 2), salt=4)),
        },
    }
    server = jax.tree.map(lambda x: np.zeros(x.shape[1:], x.dtype), stacked)
    server["b"]["num_batches_tracked"] = jnp.int32(4)
    out = pool_stats(stacked, w, server)
    assert jax.tree.map(lambda x: x.dtype, out) == jax.tree.map(lambda x: x.dtype, server)
    for m, v, got, tol in (
        (stacked["a"]["bn"]["mean"], stacked["a"]["bn"]["var"], out["a"]["bn"], 1e-5),
        (stacked["b"]["mean"], stacked["b"]["var"], out["b"], 2e-2),
    ):
        want_m, want_v = moments(m.astype(jnp.float32), v.astype(jnp.float32), w)
        np.testing.assert_allclose(np.asarray(got["mean"], np.float32), want_m, rtol=tol, atol=tol)
        np.testing.assert_allclose(np.asarray(got["var"], np.float32), want_v, rtol=tol, atol=tol)
    np.testing.assert_allclose(out["b"]["other"], numpy_mean(stacked["b"]["other"], w), atol=1e-5)
    assert int(out["b"]["num_batches_tracked"]) == 4
