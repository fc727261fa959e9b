"""Many runs in one program (``fb.vmap_runs``): S runs batched equal the S runs trained alone.

Floats are compared with ``assert_allclose(rtol=1e-5, atol=1e-6)``: the batched program is the
same arithmetic, but vmap over the run axis may let XLA reorder reductions (sums over a batch,
over clients), so the last bits can differ. Integer leaves (a BN ``num_batches_tracked``, the
optimizer's step count, the round) must be exactly equal.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CounterModel, assert_trees_close, make_clients, tiny_cnn

import fedjax_bn as fb
from fedjax_bn.tree import is_integer_leaf

RUNS, ROUNDS, B = 3, 3, 4
N_MAX = 10
# Each run its own partition of the same shapes (3 clients padded to N_MAX): partial batches,
# and steps full for one run but not another (the batched plan masks them, a no-op change).
SIZES = ((5, 10, 3), (8, 4, 10), (10, 10, 7))
RTOL, ATOL = 1e-5, 1e-6  # vmap may reorder reductions: see the module docstring


@functools.cache
def algorithms() -> dict[str, fb.Algorithm]:
    """FedAvg, and FedBN with a persistent client optimizer (stacked optimizer states with an
    integer count travel on the run axis too), on a dense model with an integer BN counter and
    on a conv model. SGD with momentum, not Adam: Adam turns the float
    noise of a near-zero gradient into full steps."""
    tx = optax.sgd(0.05, momentum=0.9)
    return {
        "fedavg": fb.fedavg(CounterModel(), tx),
        "fedbn": fb.fedbn(CounterModel(), tx, persist_client_optimizer=True),
        "fedbn_cnn": fb.fedbn(tiny_cnn(), tx, persist_client_optimizer=True),
    }


def run_data(r: int) -> Any:
    return make_clients(10 + r, SIZES[r], n_max=N_MAX)


def init_states(alg: fb.Algorithm, sample_x: jax.Array) -> list[Any]:
    return [alg.init(jax.random.key(100 + r), sample_x, len(SIZES[r])) for r in range(RUNS)]


@functools.cache
def round_of(alg: fb.Algorithm, executor: str) -> Any:
    """One round function per (algorithm, executor): the tests share their compiled programs."""
    if executor == "runs":
        return fb.vmap_runs(alg, batch_size=B)
    return fb.make_round(alg, executor=executor, batch_size=B)


def alone(alg: fb.Algorithm, state: Any, train: Any, key: jax.Array, executor: str) -> Any:
    """One run trained by itself, ROUNDS rounds; returns (state, last result)."""
    round_fn = round_of(alg, executor)
    result = None
    for _ in range(ROUNDS):
        key, round_key = jax.random.split(key)
        state, result = round_fn(state, train, round_key)
    return state, result


def batched(alg: fb.Algorithm, states: list[Any], trains: Any, keys: jax.Array) -> Any:
    """The same runs as one batched federation, with the same per-run key splits."""
    round_fn = round_of(alg, "runs")
    state, result = fb.stack_runs(states, "states"), None
    for _ in range(ROUNDS):
        split = jax.vmap(jax.random.split)(keys)
        keys, round_keys = split[:, 0], split[:, 1]
        state, result = round_fn(state, trains, round_keys)
    return state, result


def assert_run_equal(got: Any, want: Any) -> None:
    """Integer leaves exactly equal, float leaves allclose (RTOL, ATOL), same structure."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert jnp.result_type(g) == jnp.result_type(w)
        if is_integer_leaf(w) or jnp.result_type(w) == jnp.bool_:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        else:
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["fedavg", "fedbn", "fedbn_cnn"])
def test_batched_runs_equal_runs_alone(name: str, sample_x: jax.Array) -> None:
    alg = algorithms()[name]
    states = init_states(alg, sample_x)
    keys = [jax.random.key(200 + r) for r in range(RUNS)]
    trains = [run_data(r) for r in range(RUNS)]
    got_state, got_result = batched(alg, states, fb.stack_runs(trains, "data"), jnp.stack(keys))
    for r in range(RUNS):
        want_state, want_result = alone(alg, states[r], trains[r], keys[r], "vmap")
        assert_run_equal(fb.unstack_run(got_state, r), want_state)
        assert_run_equal(fb.unstack_run(got_result, r), want_result)
    # BN statistics are in the compared state, and they moved: the runs really trained.
    stats = fb.unstack_run(got_state, 0).server.pooled
    if name.startswith("fedbn"):
        stats = fb.unstack_run(got_state, 0).clients.local
    assert jax.tree.leaves(stats["batch_stats"])


def test_batched_equals_sequential_runs(sample_x: jax.Array) -> None:
    """Against the CPU's default executor (what a runner's separate runs use). On the conv
    model the sequential and vmap executors agree bitwise, so the batched runs must be within
    the same tolerance of the sequential ones too."""
    alg = algorithms()["fedbn_cnn"]
    states = init_states(alg, sample_x)
    keys = [jax.random.key(300 + r) for r in range(RUNS)]
    trains = [run_data(r) for r in range(RUNS)]
    got, _ = batched(alg, states, fb.stack_runs(trains, "data"), jnp.stack(keys))
    for r in range(RUNS):
        want, _ = alone(alg, states[r], trains[r], keys[r], "sequential")
        assert_run_equal(fb.unstack_run(got, r), want)


def test_shared_data_and_distinct_seeds(sample_x: jax.Array) -> None:
    """One data set for every run: runs differ by init and batch order only, and do differ."""
    alg = algorithms()["fedavg"]
    train = run_data(0)
    states = [alg.init(jax.random.key(r), sample_x, 3) for r in range(RUNS)]
    keys = jnp.stack([jax.random.key(400 + r) for r in range(RUNS)])
    got, _ = batched(alg, states, train, keys)
    for r in range(RUNS):
        want, _ = alone(alg, states[r], train, keys[r], "vmap")
        assert_run_equal(fb.unstack_run(got, r), want)
    a, b = (fb.unstack_run(got, r).server.shared for r in (0, 1))
    assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])


def test_stack_and_unstack_are_inverse(sample_x: jax.Array) -> None:
    states = init_states(algorithms()["fedbn"], sample_x)
    stacked = fb.stack_runs(states)
    assert int(stacked.round.shape[0]) == RUNS
    for r in range(RUNS):
        assert_trees_close(fb.unstack_run(stacked, r), states[r], rtol=0, atol=0)


def test_runs_with_different_data_shapes_are_refused() -> None:
    trains = [make_clients(0, (5, 10, 3)), make_clients(1, (5, 12, 3))]  # N_max 10 vs 12
    with pytest.raises(ValueError, match=r"same padded client size N_max"):
        fb.stack_runs(trains, "data")
    with pytest.raises(ValueError, match="another tree structure"):
        fb.stack_runs([{"a": 1}, {"b": 1}])


def test_key_and_data_counts_must_match_the_runs(sample_x: jax.Array) -> None:
    alg = algorithms()["fedavg"]
    state = fb.stack_runs(init_states(alg, sample_x))
    round_fn = fb.vmap_runs(alg, batch_size=B)
    trains = fb.stack_runs([run_data(0), run_data(1)])
    with pytest.raises(ValueError, match="one round key per run"):
        round_fn(state, run_data(0), jnp.stack([jax.random.key(0)] * 2))
    with pytest.raises(ValueError, match="the data holds 2 runs, the state 3"):
        round_fn(state, trains, jnp.stack([jax.random.key(0)] * RUNS))
    with pytest.raises(ValueError, match="chunk_size"):
        fb.vmap_runs(alg, chunk_size=0)
