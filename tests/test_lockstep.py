"""Tests for the lockstep executors' static step plans (fedjax_bn.execution.plan.make_plan,
run by ``VmapExecutor``, ``ChunkedExecutor`` and ``ShardedExecutor``): every real step runs
once, and grouping clients by size never pads more."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedjax_bn.execution.plan import client_order, make_plan, padded_fraction, real_steps

sizes_st = st.lists(st.integers(1, 40), min_size=1, max_size=12)


@given(sizes=sizes_st, batch=st.integers(1, 8), epochs=st.integers(1, 3), groups=st.integers(1, 5))
def test_plan_runs_every_real_step_once_and_grouping_never_pads_more(
    sizes: list[int], batch: int, epochs: int, groups: int
) -> None:
    n_max = max(sizes)
    one = make_plan(sizes, batch, epochs, n_max)
    plan = make_plan(sizes, batch, epochs, n_max, num_groups=groups)
    real = sum(real_steps(n, batch, epochs) for n in sizes)
    assert plan.real_steps() == one.real_steps() == real
    assert plan.run_steps() <= one.run_steps() == len(sizes) * epochs * math.ceil(n_max / batch)
    assert 0.0 <= plan.padded_fraction() <= one.padded_fraction() < 1.0
    assert one.padded_fraction() == pytest.approx(padded_fraction(sizes, batch, epochs))
    ran = [c for g in plan.groups for c in (g.clients or range(len(sizes)))[: g.num_real]]
    assert sorted(ran) == list(range(len(sizes)))
    order = client_order(plan)
    assert order is None or np.array_equal(np.asarray(ran)[order], np.arange(len(sizes)))
    for g in plan.groups:  # full steps are full for every real client of the group
        members = list(g.clients or range(len(sizes)))[: g.num_real]
        assert all(g.full * batch <= sizes[c] <= g.n_hi for c in members)
