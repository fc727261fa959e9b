"""Tests for the sequential executor (fedjax_bn.execution.sequential) and its host-side
schedules (``plan.schedule``, ``plan.dispatches``, ``plan.lanes``): any number of client
lanes gives bitwise the one-lane round; schedules run each real step once, in call kinds that
compile once."""

from __future__ import annotations

import math
import threading

import jax
import numpy as np
import optax
from conftest import make_clients, tiny_cnn
from hypothesis import given
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn import budgets
from fedjax_bn.execution import make_round
from fedjax_bn.execution.plan import Dispatch, dispatches, lanes, schedule

B = 4


def test_client_threads_give_bitwise_the_one_thread_round() -> None:
    """FedBN + FedProx with persistent client optimizers: 1 and 3 lanes, the same bits."""
    tx = optax.sgd(0.05, momentum=0.9)
    alg = fb.fedbn_prox(tiny_cnn(), tx, mu=0.1, persist_client_optimizer=True)
    data = make_clients(0, (5, 10, 3))
    outs = []
    for threads in (1, 3):
        rnd = make_round(alg, executor="sequential", batch_size=B, client_threads=threads)
        state = alg.init(jax.random.key(0), data.x[0, :1], 3)
        for r in range(2):
            state, res = rnd(state, data, jax.random.key(r))
        outs.append((state, res))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_many_sequential_rounds_share_a_bounded_number_of_lane_threads() -> None:
    """Rounds built, run and kept (or dropped uncollected) do not each hold a pool: the host
    threads alive grow by at most the lanes of one round, however many rounds exist."""
    alg = fb.fedavg(tiny_cnn(), optax.sgd(0.05))
    data = make_clients(3, (3, 2, 4))
    state = alg.init(jax.random.key(0), data.x[0, :1], 3)
    before = threading.active_count()
    rounds = []
    for r in range(6):
        rnd = make_round(alg, executor="sequential", batch_size=B, client_threads=3)
        jax.block_until_ready(rnd(state, data, jax.random.key(r)))
        rounds.append(rnd)
    assert threading.active_count() <= before + 2


def test_lanes_are_bitwise_for_scaffold_with_budgets_and_an_empty_client() -> None:
    """SCAFFOLD's opening computes a correction; budgets (0 to 3 steps) leave some clients with
    nothing to run, and one client has no data: 1, 2 and 4 lanes give the same bits."""
    alg = fb.scaffold(tiny_cnn(), optax.sgd(0.05), lr=0.05)
    data = make_clients(2, (6, 0, 9, 3, 5))
    budget = budgets.uniform_steps(0, 3)
    outs = []
    for threads in (1, 2, 4):
        rnd = make_round(
            alg, executor="sequential", batch_size=B, budget=budget, client_threads=threads
        )
        state = alg.init(jax.random.key(0), data.x[0, :1], 5)
        for r in range(2):
            state, res = rnd(state, data, jax.random.key(r))
        outs.append((state, res))
    for other in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(other), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@given(n=st.integers(0, 40), batch=st.integers(1, 8), epochs=st.integers(1, 3))
def test_sequential_schedule_masks_only_partial_batches(n: int, batch: int, epochs: int) -> None:
    n_max = 40
    calls = schedule(n, n_max, batch, epochs, per_call=3)
    steps = [s + i for s, num, _ in calls for i in range(num)]
    spe = math.ceil(n_max / batch)
    want = [e * spe + j for e in range(epochs) for j in range(math.ceil(n / batch))]
    assert steps == want
    assert all(num <= 3 for _, num, _ in calls)
    for s, num, masked in calls:
        assert masked == ((s % spe + 1) * batch > n)  # masked exactly when the batch is partial
        assert not masked or num == 1


@given(
    n=st.integers(0, 40),
    batch=st.integers(1, 8),
    epochs=st.integers(1, 3),
    per_call=st.integers(1, 3),
    budget=st.one_of(st.none(), st.integers(0, 12)),
)
def test_sequential_dispatches_close_each_client_once_in_three_step_kinds(
    n: int, batch: int, epochs: int, per_call: int, budget: int | None
) -> None:
    calls = schedule(n, 40, batch, epochs, per_call, budget)
    out = dispatches(calls)
    assert [(s, num, m) for s, num, m, _, _ in out if num] == [c for c in calls if c[1]]
    if not calls:
        assert out == []
        return
    assert not any(d[3] for d in out)  # openings are the lane's
    assert [d[4] for d in out] == [False] * (len(out) - 1) + [True]  # closes once, last
    for _, num, masked, _, closes in out:
        if num == 0:
            assert not masked and closes  # a 0-step dispatch only closes
        else:
            assert masked or not closes  # a closing step is the masked one
    kinds = {(num > 0, masked, closes) for _, num, masked, _, closes in out}
    assert kinds <= {
        (True, False, False),
        (True, True, False),
        (True, True, True),
        (False, False, True),
    }


def test_sequential_dispatches_by_hand() -> None:
    assert dispatches([(0, 1, False), (1, 1, False), (2, 1, True)]) == [
        (0, 1, False, False, False), (1, 1, False, False, False), (2, 1, True, False, True)
    ]  # fmt: skip
    assert dispatches([(0, 1, True)]) == [Dispatch(0, 1, True, opens=False, closes=True)]
    assert dispatches([(0, 1, False), (1, 1, False)]) == [
        (0, 1, False, False, False), (1, 1, False, False, False), (1, 0, False, False, True)
    ]  # fmt: skip


@given(costs=st.lists(st.integers(0, 20), max_size=12), k=st.integers(1, 4))
def test_lanes_hold_every_client_with_steps_once_and_balance_them(costs: list[int], k: int) -> None:
    groups = lanes(costs, k)
    members = [c for g in groups for c in g]
    assert sorted(members) == [c for c, w in enumerate(costs) if w > 0]
    assert len(groups) == k and all(list(g) == sorted(g) for g in groups)
    loads = [sum(costs[c] for c in g) for g in groups]
    if members:  # greedy longest-first: no lane exceeds the mean by more than one client
        assert max(loads) <= sum(loads) / k + max(costs)
    assert lanes([3, 1, 2, 2], 2) == ((0, 1), (2, 3))
