"""Tests for fedjax_bn.robust: each aggregator against numpy/scipy or a hand case, absent slots
(padding, quarantine: weight zero) ignored, BN statistics folded robustly, and composition with
make_algorithm's policies, server optimizers and SCAFFOLD."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.stats
from conftest import (
    IMAGE_SHAPE,
    CounterModel,
    assert_trees_close,
    assert_trees_equal,
    make_clients,
    normal,
    sgd,
)
from hypothesis import given
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn import robust
from fedjax_bn.algorithms import Message
from fedjax_bn.algorithms.base import client_variables
from fedjax_bn.algorithms.fedavg import clip_updates
from fedjax_bn.policy import partition
from fedjax_bn.tree import flatten, repeat_clients

MODEL = CounterModel()
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
SIZES = (5, 8, 6)
COUNTER = ("batch_stats", "CountedBN_0", "num_batches_tracked")
agg_jit = jax.jit(robust.aggregate, static_argnums=0)


def tree_of(x_C: np.ndarray) -> dict[str, Any]:
    """A stacked tree with one float leaf ``[C, ...]`` and one int32 leaf ``[C]``."""
    c = x_C.shape[0]
    return {"w": jnp.asarray(x_C, jnp.float32), "n": jnp.arange(c, dtype=jnp.int32) + 7}


def server_like(x_C: np.ndarray) -> dict[str, Any]:
    return {"w": jnp.zeros(x_C.shape[1:], jnp.float32), "n": jnp.int32(3)}


@st.composite
def cohort(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """``[C, 3]`` client values and weights where some slots are absent (weight 0) and hold
    garbage (huge values), as padding slots and quarantined clients do."""
    c = draw(st.integers(1, 7))
    x = normal(draw(st.integers(0, 2**31 - 1)), (c, 3))
    present = draw(st.lists(st.booleans(), min_size=c, max_size=c))
    present[draw(st.integers(0, c - 1))] = True
    w = np.where(present, draw(st.floats(0.5, 50.0)), 0.0).astype(np.float32)
    x = np.where(np.asarray(present)[:, None], x, 1e9).astype(np.float32)
    return x, w


@given(data=cohort())
def test_median_equals_numpy_over_present_clients(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, w = data
    out = agg_jit(robust.median(), tree_of(x), w, server_like(x))
    np.testing.assert_allclose(out["w"], np.median(x[w > 0], axis=0), rtol=1e-6, atol=1e-6)
    assert out["n"].dtype == jnp.int32 and int(out["n"]) == 3


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.2, 0.3, 0.45])
@given(data=cohort())
def test_trimmed_mean_equals_scipy(beta: float, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, w = data
    out = agg_jit(robust.trimmed_mean(beta), tree_of(x), w, server_like(x))
    want = scipy.stats.trim_mean(x[w > 0].astype(np.float64), beta, axis=0)
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-6)


def test_hand_cases_with_padding_and_a_quarantined_slot() -> None:
    """Five clients, a padding slot and a quarantined slot holding NaN (weight 0)."""
    x = np.array([[1.0], [7.0], [3.0], [9.0], [100.0], [0.0], [np.nan]], np.float32)
    w = np.array([1, 5, 2, 1, 1, 0, 0], np.float32)
    server = server_like(x)
    assert float(agg_jit(robust.median(), tree_of(x), w, server)["w"][0]) == 7.0
    # beta 0.2 of 5 clients: one cut at each end, mean of 3, 7, 9.
    np.testing.assert_allclose(
        agg_jit(robust.trimmed_mean(0.2), tree_of(x), w, server)["w"], [19 / 3], rtol=1e-6
    )
    np.testing.assert_allclose(
        agg_jit(robust.mean(), tree_of(x), w, server)["w"], [(1 + 35 + 6 + 9 + 100) / 10]
    )


KRUM_X = np.array([0, 2, 3, 4, 7, 100, 100, 2.5], np.float32)[:, None] * np.ones((1, 2))
KRUM_W = np.array([1, 1, 1, 1, 1, 1, 1, 0], np.float32)  # the last slot is padding


def test_krum_picks_the_honest_client_of_the_hand_case() -> None:
    """Seven clients, two Byzantine at 100 (f=2 < (7 - 2) / 2): with ``n - f - 2 = 3``
    neighbours, client scores (1-D, squared distances, times 2 coordinates) are 0: 29,
    2: 9, 3: 11, 4: 14, 7: 50 and the Byzantine ones thousands, so Krum sends client 2's
    update (the padding slot at 2.5, weight 0, would otherwise change every score)."""
    x = KRUM_X.astype(np.float32)
    scores = robust.krum_scores(jnp.asarray(x), jnp.asarray(KRUM_W > 0), 2)
    np.testing.assert_allclose(scores[:5], 2 * np.array([29, 9, 11, 14, 50]), rtol=1e-6)
    assert np.isinf(scores[7]) and np.all(scores[5:7] > 1e3)
    out = agg_jit(robust.krum(2), tree_of(x), KRUM_W, server_like(x))
    np.testing.assert_array_equal(out["w"], [2.0, 2.0])
    multi = agg_jit(robust.multi_krum(2, 3), tree_of(x), KRUM_W, server_like(x))
    np.testing.assert_allclose(multi["w"], [3.0, 3.0])  # mean of clients 2, 3, 4
    default = agg_jit(robust.multi_krum(2), tree_of(x), KRUM_W, server_like(x))
    np.testing.assert_allclose(default["w"], [16 / 5] * 2)  # n - f = 5 best: 0, 2, 3, 4, 7


def test_geometric_median_matches_scipy_minimizer() -> None:
    """The weighted geometric median of 2-D points with an outlier, against a direct
    minimization of ``sum_i a_i ||v - x_i||``."""
    x = np.array([[0, 0], [1, 0], [0, 1], [1, 1.5], [50, -40]], np.float32)
    w = np.array([1, 2, 1, 1, 1], np.float32)
    out = agg_jit(robust.geometric_median(200, 1e-8), tree_of(x), w, server_like(x))["w"]

    def objective(v: np.ndarray) -> float:
        return float(np.sum(w * np.linalg.norm(x - v, axis=1)))

    best = scipy.optimize.minimize(objective, x.mean(0), method="Nelder-Mead", tol=1e-10).x
    np.testing.assert_allclose(out, best, atol=2e-3)
    assert objective(np.asarray(out)) <= objective(best) + 1e-4


def test_norm_bound_equals_clip_norm_then_mean() -> None:
    x = normal(3, (4, 2, 3)) * np.array([0.1, 1.0, 10.0, 3.0])[:, None, None]
    w = np.array([1.0, 2.0, 3.0, 0.0], np.float32)
    stacked, server = {"w": jnp.asarray(x, jnp.float32)}, {"w": jnp.ones((2, 3), jnp.float32)}
    got = robust.aggregate(robust.norm_bound(1.5), stacked, w, server)
    want = fb.weighted_mean(clip_updates(stacked, server, 1.5), w, server)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_bad_arguments_get_one_clear_error() -> None:
    for beta in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\)"):
            robust.trimmed_mean(beta)
    for f in (-1, 1.5):
        with pytest.raises(ValueError, match="f .* must be an int >= 0"):
            robust.krum(f)
    x = np.zeros((6, 2), np.float32)
    with pytest.raises(ValueError, match="needs at least 7 clients per round, got a cohort of 6"):
        robust.aggregate(robust.krum(2), tree_of(x), np.ones(6), server_like(x))
    with pytest.raises(ValueError, match="bn_stats='robust' needs an aggregator"):
        fb.make_algorithm(MODEL, sgd(), policy="fedavg", bn_stats="robust")
    with pytest.raises(ValueError, match="fednova"):
        fb.make_algorithm(
            MODEL, sgd(), policy="fedavg", aggregator=robust.median(), normalize="fednova"
        )
    assert fb.aggregators.median().name == "median"  # the spelling


# ------------------------------------------------------------------ in make_algorithm


@functools.cache
def algorithm(policy: str, kind: str) -> fb.Algorithm:
    build = {
        "mean": lambda: fb.make_algorithm(MODEL, sgd(), policy=policy),
        "median": lambda: fb.make_algorithm(
            MODEL, sgd(), policy=policy, aggregator=fb.aggregators.median()
        ),
        "median_avg_stats": lambda: fb.make_algorithm(
            MODEL, sgd(), policy=policy, aggregator=robust.median(), bn_stats="pooled"
        ),
        "median_sgd1": lambda: fb.make_algorithm(
            MODEL, sgd(), policy=policy, aggregator=robust.median(), server_tx=optax.sgd(1.0)
        ),
        "scaffold_median": lambda: fb.scaffold(
            MODEL, sgd(), lr=0.1, policy=policy, aggregator=robust.median()
        ),
        "fedadam_krum": lambda: fb.fedadam(MODEL, sgd(), policy=policy, aggregator=robust.krum(0)),
    }
    return build[kind]()


def fake_messages(policy: str, num_clients: int) -> Message:
    """Stacked client variables: client c's floats are ``|noise| + c`` (variances positive)."""
    alg = algorithm(policy, "mean")
    one = client_variables(alg.init(jax.random.key(0), SAMPLE_X, num_clients), 0)

    def fill(path: Any, leaf: Any) -> Any:
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return leaf
        seed = len(jax.tree_util.keystr(path))
        noise = np.abs(normal(seed, leaf.shape)) + np.arange(num_clients).reshape(
            -1, *[1] * (leaf.ndim - 1)
        )
        return jnp.asarray(noise, leaf.dtype)

    stacked = jax.tree_util.tree_map_with_path(fill, repeat_clients(one, num_clients))
    parts = partition(stacked, policy)
    return Message(parts.shared, parts.pooled)


def test_robust_bn_statistics_ignore_one_client_with_huge_statistics() -> None:
    """One client's running means and variances are 1e6: the median of the others' holds,
    variances stay positive, the counter keeps the server's value; averaged statistics would
    move to ~2.5e5 (the assertion that fails without robust statistics)."""
    msgs = fake_messages("fedavg", 4)
    bad = jax.tree.map(
        lambda s: s.at[0].set(1e6) if jnp.issubdtype(s.dtype, jnp.floating) else s, msgs.pooled
    )
    msgs = msgs._replace(pooled=bad)
    w = jnp.ones(4)
    server = algorithm("fedavg", "median").init(jax.random.key(0), SAMPLE_X, 4).server
    robust_pooled = jax.jit(algorithm("fedavg", "median").server_update)(server, msgs, w).pooled
    avg_pooled = jax.jit(algorithm("fedavg", "median_avg_stats").server_update)(server, msgs, w)
    for path, leaf in flatten(robust_pooled).items():
        stacked = np.asarray(flatten(bad)[path])
        if path == COUNTER:
            assert leaf.dtype == jnp.int32 and int(leaf) == int(flatten(server.pooled)[path])
            continue
        np.testing.assert_allclose(leaf, np.median(stacked, axis=0), rtol=1e-5)
        assert np.all(np.asarray(leaf) < 10) and np.all(np.asarray(leaf) >= 0)
        assert np.all(np.asarray(flatten(avg_pooled.pooled)[path]) > 1e5)


def run_round(policy: str, kind: str, state: Any = None) -> Any:
    alg = algorithm(policy, kind)
    state = alg.init(jax.random.key(0), SAMPLE_X, len(SIZES)) if state is None else state
    round_fn = fb.make_round(alg, executor="sequential", batch_size=8)
    return round_fn(state, make_clients(0, SIZES, n_max=8), jax.random.key(1))[0]


def test_fedbn_with_a_robust_aggregator_never_touches_local_leaves() -> None:
    """Under fedbn the BN layers never reach the aggregator: the clients' local leaves after a
    round are bitwise those of the plain-mean run, and the server holds no BN leaf."""
    plain, med = run_round("fedbn", "mean"), run_round("fedbn", "median")
    assert_trees_equal(plain.clients.local, med.clients.local)
    assert "CountedBN_0" not in med.server.shared["params"] and not med.server.pooled


@pytest.mark.parametrize("kind", ["median_sgd1", "scaffold_median", "fedadam_krum"])
def test_server_optimizers_and_scaffold_compose(kind: str) -> None:
    state = run_round("fedavg", kind)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.server.shared))
    if kind == "median_sgd1":  # sgd(1.0) steps the pseudo-gradient back to the median
        assert_trees_close(
            state.server.shared, run_round("fedavg", "median").server.shared, rtol=1e-5, atol=1e-6
        )
