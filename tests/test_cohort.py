"""Tests for cohort rounds (``make_round(cohort_size=...)``, fedjax_bn.execution.cohort/store).

A cohort round of every client is the full round, bit for bit; clients that sit out keep their
state bit for bit; host placement equals device placement bit for bit; SCAFFOLD's server
control moves by ``|S| / N``; an empty cohort changes nothing; rounds compile once per bucket.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CounterModel, assert_trees_close, assert_trees_equal, make_clients, sgd

import fedjax_bn as fb
from fedjax_bn import sampling
from fedjax_bn.execution import CohortRound, make_round, size_buckets, store
from fedjax_bn.execution.cohort import bucket_key, plan_sizes, size_bucket
from fedjax_bn.execution.plan import make_plan
from fedjax_bn.execution.streams import EXECUTOR_STREAM

SIZES = (3, 7, 1, 12, 5, 9)
N, B = len(SIZES), 4
DATA = make_clients(0, SIZES)


def algorithm() -> fb.Algorithm:
    """FedBN with a persistent client optimizer: local BN leaves, an int32 counter and stacked
    optimizer states, all per client."""
    return fb.fedbn(CounterModel(), optax.sgd(0.1, momentum=0.9), persist_client_optimizer=True)


def init(alg: fb.Algorithm, num: int = N) -> fb.FedState:
    return alg.init(jax.random.key(0), DATA.x[0, :1], num)


def rounds(rnd: Any, state: fb.FedState, data: Any, num: int) -> tuple[fb.FedState, list[Any]]:
    results = []
    for r in range(num):
        state, res = rnd(state, data, jax.random.key(10 + r))
        results.append(res)
    return state, results


def row(tree: Any, c: int) -> Any:
    return jax.tree.map(lambda a: np.asarray(a)[c], tree)


def test_a_cohort_of_everyone_is_the_full_round_bitwise() -> None:
    alg = algorithm()
    full = make_round(alg, executor="sequential", batch_size=B, local_epochs=2)
    cohort = make_round(alg, executor="sequential", batch_size=B, local_epochs=2, cohort_size=N)
    a, b = init(alg), init(alg)
    for r in range(2):
        key = jax.random.key(r)
        a, want = full(a, DATA, jax.random.fold_in(key, EXECUTOR_STREAM))
        b, got = cohort(b, DATA, key)
        np.testing.assert_array_equal(got.clients, np.arange(N))
        assert_trees_equal(got, want)  # clients included: arange(N) in both
    assert_trees_equal(b, a)


def test_clients_that_sit_out_keep_their_state_bitwise() -> None:
    alg = algorithm()
    rnd = make_round(alg, executor="sequential", batch_size=B, cohort_size=2)
    assert isinstance(rnd, CohortRound)
    state = init(alg)
    seen: set[int] = set()
    for r in range(3):
        new, res = rnd(state, DATA, jax.random.key(r))
        ids = np.asarray(res.clients)
        assert len(ids) == 2 and np.all(np.diff(ids) > 0)
        np.testing.assert_array_equal(res.num_seen, np.asarray(SIZES)[ids])
        for c in range(N):
            if c in ids:  # trained: its BN counter moved by its number of steps
                counter = new.clients.local["batch_stats"]["CountedBN_0"]["num_batches_tracked"]
                old = state.clients.local["batch_stats"]["CountedBN_0"]["num_batches_tracked"]
                assert int(counter[c]) == int(old[c]) + -(-SIZES[c] // B)
            else:
                assert_trees_equal(row(new.clients, c), row(state.clients, c))
        assert int(new.round) == r + 1
        seen |= set(ids.tolist())
        state = new
    assert len(seen) > 2


def test_host_placement_equals_device_placement_bitwise() -> None:
    alg = algorithm()
    stages = make_round(alg, executor="sequential", batch_size=B).stages  # one compile
    out = {}
    for placement, data in [
        ("device", DATA),
        ("host", DATA),
        ("host", store.to_host(DATA)),
        ("device", store.to_host(DATA)),
    ]:
        rnd = CohortRound(stages, cohort_size=3, sampler="uniform", state_placement=placement)
        state, results = rounds(rnd, init(alg), data, 3)
        assert rnd.placement == placement
        assert store.is_host(state.clients) == (placement == "host")
        out[placement, isinstance(data.x, np.ndarray)] = (state, results)
    want = out["device", False]
    for got in out.values():
        assert_trees_equal(jax.device_get(got), jax.device_get(want))
    auto = CohortRound(stages, cohort_size=3, sampler="uniform", state_placement="auto")
    rounds(auto, init(alg), DATA, 1)
    assert auto.placement == "device"  # a few KiB fit any device's budget


@pytest.mark.parametrize("placement", ["device", "host"])
def test_donated_state_gives_the_same_rounds_and_consumes_its_input(placement) -> None:
    alg = algorithm()
    stages = make_round(alg, executor="sequential", batch_size=B).stages
    pure = CohortRound(stages, cohort_size=3, sampler="uniform", state_placement=placement)
    donated = CohortRound(
        stages, cohort_size=3, sampler="uniform", state_placement=placement, donate_state=True
    )
    want, _ = rounds(pure, init(alg), DATA, 3)
    start = jax.tree.map(np.asarray, init(alg)) if placement == "host" else init(alg)
    got, _ = rounds(donated, start, DATA, 3)
    assert_trees_equal(jax.device_get(got), jax.device_get(want))
    if placement == "device":  # the rows were written into the donated buffers
        assert any(leaf.is_deleted() for leaf in jax.tree.leaves(start.clients))


def test_vmap_cohorts_match_sequential_with_bucketed_plans() -> None:
    alg = algorithm()
    out = []
    for executor in ("sequential", "vmap"):
        rnd = make_round(alg, executor=executor, batch_size=B, cohort_size=3, loop="scan")
        out.append(rounds(rnd, init(alg), DATA, 3))
    assert_trees_close(out[1], out[0], rtol=1e-4, atol=1e-5)


def control_fraction(alg: fb.Algorithm, sampler: Any, cohort_size: int) -> tuple[float, int]:
    """One SCAFFOLD cohort round from zero controls: the factor ``f`` with
    ``c_server = f * mean_{i in S} c_i`` (least squares), and ``|S|``."""
    rnd = make_round(
        alg, executor="sequential", batch_size=B, cohort_size=cohort_size, sampler=sampler
    )
    state, res = rnd(init(alg), DATA, jax.random.key(3))
    ids = np.asarray(res.clients)
    real = ids[ids < N]
    mean = jax.tree.map(lambda c: np.asarray(c)[real].mean(axis=0), state.clients.control)
    got = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.server.control)])
    want = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mean)])
    sat_out = np.setdiff1d(np.arange(N), real)
    for leaf in jax.tree.leaves(state.clients.control):
        assert not np.any(np.asarray(leaf)[sat_out])  # still zero
    return float(got @ want / (want @ want)), len(real)


def test_scaffold_control_moves_by_the_participation_fraction() -> None:
    alg = fb.scaffold(CounterModel(), sgd(), lr=0.1)
    fraction, real = control_fraction(alg, "uniform", 2)
    assert real == 2 and fraction == pytest.approx(2 / N, rel=1e-5)
    online = jnp.array([0.0, 1, 0, 0, 0, 0])  # only client 1 online: |S| = 1 of a cohort of 3
    avail = functools.partial(sampling.available, probabilities=online)
    fraction, real = control_fraction(alg, avail, 3)
    assert real == 1 and fraction == pytest.approx(1 / N, rel=1e-5)


def test_an_empty_cohort_changes_nothing_but_the_round() -> None:
    alg = algorithm()
    none = functools.partial(sampling.available, probabilities=jnp.zeros(N))
    rnd = make_round(alg, executor="sequential", batch_size=B, cohort_size=2, sampler=none)
    state = init(alg)
    new, res = rnd(state, DATA, jax.random.key(0))
    np.testing.assert_array_equal(res.clients, [N, N])
    np.testing.assert_array_equal(res.num_seen, [0, 0])
    assert_trees_equal((new.server, new.clients), (state.server, state.clients))
    assert int(new.round) == 1


def test_cohort_rounds_reject_bad_options() -> None:
    alg = algorithm()
    for kwargs, match in [
        ({"cohort_size": 0}, "cohort_size"),
        ({"cohort_size": 2, "sampler": "random"}, "valid by name"),
        ({"sampler": "by_size"}, "set cohort_size"),
        ({"state_placement": "host"}, "set cohort_size"),
        ({"cohort_size": 2, "state_placement": "disk"}, "placement"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_round(alg, **kwargs)
    rnd = make_round(alg, executor="sequential", cohort_size=N + 1)
    with pytest.raises(ValueError, match="cohort_size"):
        rnd(init(alg), DATA, jax.random.key(0))
    rnd = make_round(alg, executor="sequential", cohort_size=2)
    with pytest.raises(ValueError, match="whole population"):
        rnd(init(alg, N - 1), DATA, jax.random.key(0))


# ---------------------------------------------------------------- buckets and (re)compilation

TRACES = [0]


class Traced(nn.Module):
    """CounterModel that counts its own traces (a Python side effect, never in compiled code)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        TRACES[0] += 1
        return CounterModel(name="net")(x, train=train, mask=mask)


WIDE = (1, 2, 3, 5, 7, 9, 12, 15, 20, 26, 31, 40)  # cohorts of 3 span many padded sizes


def traced_rounds(executor: str, num: int = 12) -> tuple[CohortRound, list[int], Any]:
    alg = fb.fedbn(Traced(), sgd())
    data = make_clients(1, WIDE)
    rnd = make_round(alg, executor=executor, batch_size=B, cohort_size=3, loop="scan")
    state = alg.init(jax.random.key(0), data.x[0, :1], len(WIDE))
    per_round = []
    for r in range(num):
        before = TRACES[0]
        state, _ = rnd(state, data, jax.random.key(r))
        per_round.append(TRACES[0] - before)
    return rnd, per_round, state


def test_rounds_compile_once_per_bucket() -> None:
    buckets = size_buckets(max(WIDE))
    assert buckets == (1, 2, 4, 8, 16, 32, 40)
    vmap, per_round, vmap_state = traced_rounds("vmap")
    traced = sum(t > 0 for t in per_round)
    assert 1 < len(vmap.buckets) <= 2 * len(buckets)
    assert traced <= len(vmap.buckets), (per_round, sorted(vmap.buckets))
    impl = vmap.stages.executor_for(3)
    assert impl._round._cache_size() <= len(vmap.buckets)  # one plan per (hi, lo) bucket
    seq, per_round, seq_state = traced_rounds("sequential")
    assert seq.buckets == vmap.buckets  # same keys, same cohorts
    impl = seq.stages.executor_for(3)
    his = {hi for hi, _ in seq.buckets}
    assert impl._shuffle._cache_size() == len(his)
    assert impl._begin._cache_size() == impl._finish._cache_size() == 1
    # Per N_max bucket a fixed set of call kinds: (masked, opens, closes) x steps_per_call.
    assert impl._call._cache_size() <= 8 * len(his)
    assert_trees_close(seq_state, vmap_state, rtol=1e-4, atol=1e-5)


def test_buckets_and_canonical_plans_bound_every_client() -> None:
    assert [size_bucket(n, 40) for n in (0, 1, 2, 3, 5, 16, 17, 33, 40)] == [
        1, 1, 2, 4, 8, 16, 32, 40, 40
    ]  # fmt: skip
    assert bucket_key((9, 12, 16), 40) == (16, 8) and bucket_key((7, 12, 16), 40) == (16, 0)
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = tuple(int(n) for n in rng.integers(0, 41, rng.integers(2, 6)))
        hi, lo = bucket_key(sizes, 40)
        assert max(sizes) <= hi <= 40 and lo <= min(sizes)
        canon = make_plan(plan_sizes(sizes, hi, exact=False), B, 2, hi)
        real = make_plan(sizes, B, 2, hi)
        (g,), (r,) = canon.groups, real.groups
        assert g.full <= r.full and set(r.steps) <= set(g.steps) and g.n_hi >= r.n_hi
    assert plan_sizes((3, 9), 16, exact=True) == (3, 9)


def test_store_placement_threshold_and_scatter() -> None:
    tree = {"a": np.zeros((4, 3), np.float32), "b": np.zeros((4,), np.int32)}
    assert store.tree_nbytes(tree) == 4 * 3 * 4 + 4 * 4
    assert store.resolve_placement("auto", 100, budget=100) == "device"
    assert store.resolve_placement("auto", 101, budget=100) == "host"
    assert store.resolve_placement("host", 1) == "host"
    if jax.devices()[0].memory_stats() is None:
        assert store.device_budget() == store.DEFAULT_DEVICE_BUDGET
    ids = np.array([1, 3, 4], np.int32)  # 4 = N: an empty slot, never written
    new = {"a": jnp.ones((3, 3), jnp.float32), "b": jnp.array([5, 6, 7], jnp.int32)}
    host = store.scatter(tree, ids, new, 4)
    dev = store.scatter(store.place(tree, "device"), ids, new, 4)
    assert_trees_equal(jax.device_get(dev), host)
    np.testing.assert_array_equal(host["b"], [0, 5, 0, 6])
    assert not np.any(tree["a"])  # the host scatter copied
    got = jax.device_get((store.gather(host, ids, 4), store.gather(dev, ids, 4)))
    assert_trees_equal(got[0], got[1])
    np.testing.assert_array_equal(got[0]["b"], [5, 6, 6])  # the empty slot reads row N - 1
