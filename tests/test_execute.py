"""Tests across the executors (fedjax_bn.execution): the interface, options and registry.

Every executor must give the same round (allclose) on a tiny model with clients of different
sizes, and no executor may re-trace after its first round. Each executor's own tests:
``test_sequential.py``, ``test_lockstep.py``, ``test_sharded.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_trees_close, make_clients, tiny_cnn

import fedjax_bn as fb
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution import (
    EXECUTORS,
    REGISTRY,
    ChunkedExecutor,
    RoundOptions,
    RoundResult,
    SequentialExecutor,
    VmapExecutor,
    choose_executor,
    make_round,
    padded_fraction,
)
from fedjax_bn.execution.cohort import plan_sizes, size_bucket
from fedjax_bn.execution.sequential import default_client_threads

SIZES = (5, 10, 3)  # different sizes and partial last batches: 2, 3 and 1 steps per epoch
B, EPOCHS, ROUNDS = 4, 2, 3
# (executor, options): every way to run a round; each must agree with the first.
CONFIGS = [
    ("sequential", {"client_threads": 1}),
    ("sequential", {"client_threads": 3}),  # a lane per client
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


def test_no_executor_retraces_after_the_first_round(outcomes: list[dict[str, Any]]) -> None:
    for (executor, options), got in zip(CONFIGS, outcomes, strict=True):
        first, *later = got["traces"]
        assert first > 0 and later == [0] * (ROUNDS - 1), (executor, options, got["traces"])


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


def test_every_round_reports_its_clients(outcomes: list[dict[str, Any]]) -> None:
    """Every client trains: ``RoundResult.clients`` is ``arange(C)`` under every executor."""
    for (executor, _), got in zip(CONFIGS, outcomes, strict=True):
        clients = np.asarray(got["out"][1].clients)
        np.testing.assert_array_equal(clients, np.arange(len(SIZES)), err_msg=executor)


def test_round_options_are_frozen_and_none_is_the_executors_default() -> None:
    alg = fb.fedavg(tiny_cnn(), optax.sgd(0.1))
    options = RoundOptions(executor="sequential", batch_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.batch_size = 4  # type: ignore[misc]
    rnd = make_round(alg, options, batch_size=4)  # keywords override the options' fields
    assert rnd.options == RoundOptions(executor="sequential", batch_size=4)
    assert options.batch_size == 8
    seq = rnd.stages.executor_for(3)
    assert isinstance(seq, SequentialExecutor) and seq.exact_sizes
    assert (seq.steps_per_call, seq.client_threads) == (1, default_client_threads())
    chunked = make_round(alg, executor="chunked", num_groups=2).stages.executor_for(3)
    assert isinstance(chunked, ChunkedExecutor) and chunked.exact_sizes
    assert chunked.num_groups == 2
    vmap = make_round(alg, executor="vmap").stages.executor_for(3)
    assert isinstance(vmap, VmapExecutor) and not vmap.exact_sizes and vmap.num_groups == 1
    assert vmap.padded_fraction((4, 8), 8) == pytest.approx(padded_fraction((4, 8), 32, 1))


class Echo:
    """A new executor in a few lines: trains nothing, records the sizes it was given."""

    exact_sizes = False
    calls: list[tuple[int, ...]] = []

    def __init__(self, alg: fb.Algorithm, options: RoundOptions) -> None:
        self.options = options

    def __call__(self, state, train, key, sizes, batches=None, budget=None, ids=None):
        Echo.calls.append(sizes)
        num = len(sizes)
        clients = np.arange(num) if ids is None else np.asarray(ids)
        zeros = jnp.zeros(num)
        result = RoundResult(zeros, {}, zeros, jnp.zeros(num, bool), jnp.asarray(clients))
        return state._replace(round=state.round + 1), result

    def padded_fraction(self, sizes: tuple[int, ...], n_max: int) -> float:
        return 0.0


def test_an_executor_is_one_class_and_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registered by name, it runs plain and cohort rounds; a cohort round asks its
    ``exact_sizes`` flag which sizes to pass (canonical bucket bounds when False)."""
    alg = fb.fedavg(tiny_cnn(), optax.sgd(0.1))
    with pytest.raises(ValueError, match="valid executors"):
        RoundOptions(executor="echo")
    monkeypatch.setitem(REGISTRY, "echo", Echo)
    monkeypatch.setattr(Echo, "calls", [])
    sizes = (3, 7, 1, 12, 5)
    data = make_clients(0, sizes)
    state = alg.init(jax.random.key(0), data.x[0, :1], len(sizes))
    new, result = make_round(alg, executor="echo")(state, data, jax.random.key(1))
    assert int(new.round) == 1 and Echo.calls == [sizes]
    np.testing.assert_array_equal(result.clients, np.arange(len(sizes)))
    cohort = make_round(alg, executor="echo", cohort_size=3)
    _, result = cohort(state, data, jax.random.key(2))
    ids = np.asarray(result.clients)
    real = tuple(sizes[i] for i in ids)
    hi = size_bucket(max(real), max(sizes))
    assert Echo.calls[1] == plan_sizes(real, hi, exact=False) != real
