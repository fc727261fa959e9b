"""Tests for the executors (fedjax_bn.execute and the modules behind it).

Every executor must give the same round (allclose) on a tiny model with clients of different
sizes; the sharded executor on 8 forced CPU devices (a subprocess: XLA_FLAGS must be set before
jax starts) must equal vmap; no executor may re-trace after its first round.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close, make_clients, tiny_cnn
from hypothesis import given
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn import budgets
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution import EXECUTORS, choose_executor, make_round
from fedjax_bn.execution.plan import (
    client_order,
    dispatches,
    lanes,
    make_plan,
    padded_fraction,
    real_steps,
    schedule,
)

SIZES = (5, 10, 3)  # different sizes and partial last batches: 2, 3 and 1 steps per epoch
B, EPOCHS, ROUNDS = 4, 2, 3
# (executor, options): every way to run a round; each must agree with the first.
CONFIGS = [
    ("sequential", {"client_threads": 1}),
    ("sequential", {"client_threads": 3}),  # a lane per client: bitwise the one-thread round
    ("sequential", {"steps_per_call": 2}),
    ("vmap", {"loop": "unroll", "num_groups": 2}),
    ("vmap", {"loop": "scan"}),
    ("chunked", {"chunk_size": 2, "loop": "scan"}),  # 3 clients: a chunk of 2, a remainder
    ("chunked", {"chunk_size": 1, "num_groups": 3, "loop": "scan"}),
]


def algorithm() -> fb.Algorithm:
    """FedBN + FedProx with persistent client optimizers: local leaves, stacked optimizer
    states and the proximal term all go through the executors. SGD with momentum, not Adam:
    Adam turns the float noise of a zero gradient (a conv bias before BN) into full steps."""
    tx = optax.sgd(0.05, momentum=0.9)
    return fb.fedbn_prox(tiny_cnn(), tx, mu=0.1, persist_client_optimizer=True)


def uint8_clients(seed: int) -> ClientArrays:
    """Clients of sizes SIZES with uint8 images (the model normalises them in the step)."""
    data = make_clients(seed, SIZES)
    x = np.clip(np.asarray(data.x) * 40 + 128, 0, 255).astype(np.uint8)
    return data.replace(x=jnp.asarray(x))


def count_traces(fn: Any) -> int:
    """How many jaxprs are traced while ``fn()`` runs."""
    traces = []

    def listener(event: str, duration: float, **kw: Any) -> None:
        if event == "/jax/core/compile/jaxpr_trace_duration":
            traces.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        jax.block_until_ready(fn())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return len(traces)


def run_rounds(executor: str, options: dict[str, Any]) -> dict[str, Any]:
    """ROUNDS rounds on new data values (same sizes) each round; traces counted per round."""
    alg = algorithm()
    datasets = [uint8_clients(seed) for seed in range(ROUNDS)]
    keys = [jax.random.key(r) for r in range(ROUNDS)]
    rnd = make_round(alg, executor=executor, batch_size=B, local_epochs=EPOCHS, **options)
    box = [alg.init(jax.random.key(0), datasets[0].x[0, :1], len(SIZES)), None]

    def one(r: int) -> Any:
        box[:] = rnd(box[0], datasets[r], keys[r])
        return box

    traces = [count_traces(lambda r=r: one(r)) for r in range(ROUNDS)]
    assert all(d.x.dtype == jnp.uint8 for d in datasets)
    return {"out": tuple(box), "traces": traces, "executor": rnd.executor}


@pytest.fixture(scope="module")
def outcomes() -> list[dict[str, Any]]:
    """Every config's rounds, run once for the tests below (compiling dominates their cost)."""
    return [run_rounds(executor, options) for executor, options in CONFIGS]


def test_every_executor_gives_the_same_round(outcomes: list[dict[str, Any]]) -> None:
    want = outcomes[0]["out"]
    np.testing.assert_array_equal(want[1].num_seen, np.asarray(SIZES) * EPOCHS)
    assert int(want[0].round) == ROUNDS
    for (executor, options), got in zip(CONFIGS[1:], outcomes[1:], strict=True):
        assert got["executor"] == executor
        try:
            assert_trees_close(got["out"], want, rtol=1e-4, atol=1e-5)
        except AssertionError as e:
            raise AssertionError(f"{executor} {options} differs from sequential") from e


def test_client_threads_give_bitwise_the_one_thread_round(outcomes: list[dict[str, Any]]) -> None:
    one, three = outcomes[0]["out"], outcomes[1]["out"]
    assert CONFIGS[1][1] == {"client_threads": 3}
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(three), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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


def test_no_executor_retraces_after_the_first_round(outcomes: list[dict[str, Any]]) -> None:
    for (executor, options), got in zip(CONFIGS, outcomes, strict=True):
        first, *later = got["traces"]
        assert first > 0 and later == [0] * (ROUNDS - 1), (executor, options, got["traces"])


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, optax
    assert jax.device_count() == 8, jax.devices()
    from conftest import assert_trees_close, make_clients, tiny_cnn
    import fedjax_bn as fb
    from fedjax_bn.execution import make_round
    from fedjax_bn.execution.sharded import client_mesh, place

    alg = fb.fedbn_prox(tiny_cnn(), optax.sgd(0.05, momentum=0.9), mu=0.1,
                        persist_client_optimizer=True)
    for sizes in [(5, 13, 9), (5, 13, 9, 2, 8, 8, 1, 11)]:  # padded to 8 clients; even split
        data = make_clients(1, sizes)
        state = alg.init(jax.random.key(0), data.x[0, :1], len(sizes))
        out = {}
        for ex in ("vmap", "sharded"):
            s, d = state, data
            if ex == "sharded" and len(sizes) == 8:
                s, d = place(state, data, client_mesh())
            rnd = make_round(alg, executor=ex, batch_size=4, local_epochs=2, loop="scan")
            for r in range(2):
                s, res = rnd(s, d, jax.random.key(r))
            out[ex] = (s, res)
        assert_trees_close(out["sharded"], out["vmap"], rtol=1e-4, atol=1e-5)
        if len(sizes) == 8:
            leaf = jax.tree.leaves(out["sharded"][0].clients.local)[0]
            assert len(leaf.sharding.device_set) == 8, leaf.sharding
            assert leaf.addressable_shards[0].data.shape[0] == 1
    print("SHARDED OK")
    """
)


def test_sharded_on_eight_cpu_devices_equals_vmap() -> None:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tests,
    )
    assert proc.returncode == 0 and "SHARDED OK" in proc.stdout, proc.stderr[-4000:]


def test_auto_names_what_it_picked() -> None:
    assert choose_executor(10, "cpu", 1) == "sequential"
    assert choose_executor(10_000, "cpu", 8) == "sequential"
    assert choose_executor(100, "gpu", 1) == "vmap"
    assert choose_executor(100_000, "tpu", 1) == "chunked"
    assert choose_executor(100, "gpu", 4) == "sharded"
    rnd = make_round(fb.fedavg(tiny_cnn(), optax.sgd(0.1)), batch_size=B)
    assert rnd.requested == "auto" and rnd.executor is None
    data = make_clients(0, SIZES)
    assert rnd.padded_fraction(data) == 0.0  # resolving needs no compilation
    assert rnd.executor == choose_executor(len(SIZES))


def test_make_round_rejects_bad_options() -> None:
    alg = fb.fedavg(tiny_cnn(), optax.sgd(0.1))
    assert set(EXECUTORS) >= {"auto", "vmap", "chunked", "sequential", "sharded"}
    for kwargs, match in [
        ({"executor": "pmap"}, "valid executors"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"num_groups": 0}, "num_groups"),
        ({"loop": "while"}, "local loop"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"client_threads": 0}, "client_threads"),
    ]:
        with pytest.raises(ValueError, match=match):
            make_round(alg, **kwargs)


# ------------------------------------------------------------- host-side plans (no compiling)

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


@given(sizes=sizes_st, devices=st.integers(1, 8))
def test_sharded_plan_pads_each_group_to_the_device_count(sizes: list[int], devices: int) -> None:
    plan = make_plan(sizes, 4, 1, max(sizes), multiple=devices)
    for g in plan.groups:
        assert len(g.clients or sizes) % devices == 0


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
    assert dispatches([(0, 1, True)]) == [(0, 1, True, False, True)]
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
