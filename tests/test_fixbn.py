"""Tests for FixBN (algorithms/fixbn.py): FedAvg before ``fix_round``, frozen BN after.

One geometry (2 clients of sizes SIZES, N_max 8, batch 8: one full-batch step per client, one
masked) so each round function compiles once. The client optimizer is SGD with momentum, so
whether momentum is kept across rounds shows in the results.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    IMAGE_SHAPE,
    CounterModel,
    assert_trees_close,
    assert_trees_equal,
    make_clients,
)

import fedjax_bn as fb
from fedjax_bn.algorithms import Algorithm, ClientState, FedState, ServerState
from fedjax_bn.algorithms.base import stage_at

C, N_MAX, B = 2, 8, 8
SIZES = (5, 8)
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
TRACES: collections.Counter[bool] = collections.Counter()


class Traced(nn.Module):
    """CounterModel (dense + BN with an int32 counter + dense) that counts its own traces."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        TRACES[train] += 1  # a Python side effect: runs once per trace, never in compiled code
        return CounterModel(name="net")(x, train=train, mask=mask)


MODEL = Traced()
TX = optax.sgd(0.1, momentum=0.9)


@functools.cache
def algorithm(name: str) -> Algorithm:
    """One algorithm object per name, so its jitted rounds are shared by all tests."""
    build = {
        "fedavg": lambda: fb.fedavg(MODEL, TX),
        "fedavg_persist": lambda: fb.fedavg(MODEL, TX, persist_client_optimizer=True),
        "eval_persist": lambda: fb.make_algorithm(
            MODEL, TX, policy="fedavg", bn_train=False, persist_client_optimizer=True
        ),
        "fixbn2": lambda: fb.fixbn(MODEL, TX, fix_round=2),
        "fixbn2_always": lambda: fb.fixbn(MODEL, TX, fix_round=2, keep_momentum="always"),
        "fixbn1": lambda: fb.fixbn(MODEL, TX, fix_round=1),
    }
    return build[name]()


@functools.cache
def round_fn(name: str, executor: str = "sequential") -> Any:
    return fb.make_round(algorithm(name), executor=executor, batch_size=B)


def run(name: str, state: FedState, rounds: range, executor: str = "sequential") -> FedState:
    """``state`` after the given rounds, each on its own data and key (the same for any name)."""
    for r in rounds:
        data = make_clients(100 + r, SIZES, n_max=N_MAX)
        state, _ = round_fn(name, executor)(state, data, jax.random.key(r))
    return state


def start(name: str) -> FedState:
    return algorithm(name).init(jax.random.key(0), SAMPLE_X, C)


def model_of(state: FedState) -> tuple[Any, Any, Any]:
    return state.server.shared, state.server.pooled, state.clients.local


def differs(a: Any, b: Any) -> bool:
    return any(
        np.any(np.asarray(x) != np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


@pytest.mark.parametrize(
    ("name", "reference"), [("fixbn2", "fedavg"), ("fixbn2_always", "fedavg_persist")]
)
def test_rounds_before_fix_round_are_fedavg(name: str, reference: str) -> None:
    """Before ``fix_round`` FixBN is FedAvg: fresh momentum every round by default, or FedAvg
    with persisted client optimizers under ``keep_momentum="always"``."""
    fix = run(name, start(name), range(2))
    ref = run(reference, start(reference), range(2))
    assert int(fix.server.round) == int(fix.round) == 2
    assert_trees_close(model_of(fix), model_of(ref), rtol=1e-5, atol=1e-6)
    if reference == "fedavg_persist":
        assert_trees_close(fix.clients.opt_state, ref.clients.opt_state, rtol=1e-5, atol=1e-6)


def test_statistics_frozen_and_params_learn_after_fix_round() -> None:
    """Round 0 pools new statistics; from round 1 (= fix_round) they never change, bitwise,
    while the parameters, BN scale and bias included, keep moving."""
    state0 = start("fixbn1")
    states = [state0]
    for r in range(4):
        states.append(run("fixbn1", states[-1], range(r, r + 1)))
    assert differs(states[1].server.pooled, state0.server.pooled)
    for prev, new in zip(states[1:], states[2:], strict=False):
        assert_trees_equal(new.server.pooled, states[1].server.pooled)
        assert differs(new.server.shared, prev.server.shared)
        bn = new.server.shared["params"]["net"]["CountedBN_0"]["bn"]
        assert differs(bn, prev.server.shared["params"]["net"]["CountedBN_0"]["bn"])


def test_fixed_round_is_eval_mode_training_with_kept_momentum() -> None:
    """A round after the switch is a round of eval-mode BN training (``bn_train=False``) with
    each client's optimizer state carried over, from the same model and optimizer states."""
    state = run("fixbn1", start("fixbn1"), range(2))  # round 1 ran in the fixed phase
    srv = state.server
    ref_state = FedState(
        ServerState(srv.shared, srv.pooled, srv.opt_state),
        ClientState(state.clients.local, state.clients.opt_state),
        state.round,
    )
    fix = run("fixbn1", state, range(2, 3))
    ref = run("eval_persist", ref_state, range(2, 3))
    assert_trees_close(fix.server.shared, ref.server.shared, rtol=1e-5, atol=1e-6)
    assert_trees_close(fix.clients.opt_state, ref.clients.opt_state, rtol=1e-5, atol=1e-6)
    assert_trees_equal(fix.server.pooled, srv.pooled)
    assert_trees_close(ref.server.pooled, srv.pooled, rtol=1e-5, atol=1e-6)


def test_each_phase_compiles_one_bn_mode_once() -> None:
    """The phases are stages: round 0 traces train-mode BN only, the switch round eval-mode BN
    only (no ``lax.cond`` holding both), and later rounds re-trace nothing."""
    alg = fb.fixbn(MODEL, TX, fix_round=1)  # its own functions: nothing traced yet
    rnd = fb.make_round(alg, executor="sequential", batch_size=B)
    state = alg.init(jax.random.key(0), SAMPLE_X, C)
    rnd.stages.sizes(make_clients(0, SIZES, n_max=N_MAX))  # the label check's shape-only trace
    traces = [TRACES.copy()]
    for r in range(3):
        state, _ = rnd(state, make_clients(100 + r, SIZES, n_max=N_MAX), jax.random.key(r))
        traces.append(TRACES.copy())
    new = [after - before for before, after in zip(traces, traces[1:], strict=False)]
    assert new[0][True] > 0 and new[0][False] == 0, new
    assert new[1][False] > 0 and new[1][True] == 0, new
    assert not new[2], new
    assert int(state.server.round) == 3


def test_stages_equal_the_single_program_with_the_cond() -> None:
    """The staged run (the executors' host-side switch) equals the algorithm's own functions
    (one program, ``lax.cond`` on the server's round) across the switch, momentum included."""
    staged = algorithm("fixbn1")
    single = staged._replace(stages=())
    rnd = fb.make_round(single, executor="sequential", batch_size=B)
    state = single.init(jax.random.key(0), SAMPLE_X, C)
    for r in range(3):
        state, _ = rnd(state, make_clients(100 + r, SIZES, n_max=N_MAX), jax.random.key(r))
    ref = run("fixbn1", start("fixbn1"), range(3))
    assert_trees_close(state, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("round_", "index"), [(0, 0), (1, 0), (2, 1), (7, 1)])
def test_stage_at_picks_the_last_stage_started(round_: int, index: int) -> None:
    alg = algorithm("fixbn2")
    assert [first for first, _ in alg.stages] == [0, 2]
    got, stage = stage_at(alg, jnp.asarray(round_))
    assert got == index and stage is alg.stages[index][1]
    assert stage_at(stage, round_) == (0, stage)  # a stage has no stages of its own
    assert [first for first, _ in fb.fixbn(MODEL, TX, fix_round=0).stages] == [0]


def test_vmap_executor_agrees_across_the_switch() -> None:
    """The vmapped executor runs the same stages: vmap and sequential agree."""
    seq = run("fixbn1", start("fixbn1"), range(2))
    vm = run("fixbn1", start("fixbn1"), range(2), executor="vmap")
    assert_trees_close(model_of(vm), model_of(seq), rtol=1e-5, atol=1e-6)
    assert_trees_close(vm.clients.opt_state, seq.clients.opt_state, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        {"fix_round": -1},
        {"fix_round": 1, "keep_momentum": "sometimes"},
        {"fix_round": 1, "bn_train": False},
        {"fix_round": 1, "policy": "fedbn"},
    ],
)
def test_bad_arguments_are_refused(kw: dict[str, Any]) -> None:
    with pytest.raises((ValueError, TypeError)):
        fb.fixbn(MODEL, TX, **kw)


def test_cohort_rounds_switch_stage_too() -> None:
    """Sampled cohorts run the stage of the round as well: the statistics pool in round 0 and
    stay bitwise frozen from ``fix_round`` on."""
    alg = algorithm("fixbn1")
    rnd = fb.make_round(alg, executor="sequential", batch_size=B, cohort_size=1)
    states = [start("fixbn1")]
    for r in range(3):
        data = make_clients(100 + r, SIZES, n_max=N_MAX)
        states.append(rnd(states[-1], data, jax.random.key(r))[0])
    assert differs(states[1].server.pooled, states[0].server.pooled)
    assert_trees_equal(states[2].server.pooled, states[1].server.pooled)
    assert_trees_equal(states[3].server.pooled, states[1].server.pooled)
    assert differs(states[3].server.shared, states[2].server.shared)
