"""Many runs in one program (``fb.vmap_runs``) against the same runs one after another (a
script, not a test).

The digits workload: 10 clients of the embedded 8x8 digits (``digits_feature_shift``, 143-144
images each, every seed its own partition of the same shapes), SeedCNN widths (32, 64), hidden
128, FedAvg, Adam 5e-4 with coupled L2 1e-4, batch 32, one local epoch (5 steps a client). In
one process, interleaved (each timed round of one program follows one of every other, so load
on the machine hits them alike):

- ``separate/<executor>``: one seed's run alone (``make_round``), a round per call, cycling
  over the seeds; its per-run round time is the call's time;
- ``batched/S``: S seeds as one batched federation, a round of all S per call; its per-run
  round time is the call's time divided by S.

The first call of each program (compilation) is reported apart; then the median of
``--rounds`` timed calls. ``speedup`` = separate per-run time / batched per-run time (> 1:
batching wins), against each separate executor, all from the one run.

    python -m benchmarks.parallel_runs                      # S = 1, 2, 4; ~3 minutes on 2 CPUs
    python -m benchmarks.parallel_runs --runs 1,2,4,8 --rounds 5 --out results/parallel_runs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax

import fedjax_bn as fb
from fedjax_bn import data as fbd

DEFAULT_OUT = "results/parallel_runs.json"
WORKLOAD = dict(clients=10, widths=(32, 64), hidden=128, batch_size=32, lr=5e-4, l2=1e-4)


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()`` until its outputs are ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def workload(workload: dict, seeds: int) -> tuple[fb.Algorithm, list[Any], list[Any]]:
    """The algorithm, and per seed its training data and initial state."""
    model = fb.SeedCNN(num_classes=10, widths=tuple(workload["widths"]), hidden=workload["hidden"])
    tx = optax.chain(optax.add_decayed_weights(workload["l2"]), optax.adam(workload["lr"]))
    alg = fb.fedavg(model, tx)
    data = [fbd.digits_feature_shift(workload["clients"], seed=s).train for s in range(seeds)]
    states = [
        alg.init(jax.random.key(s), d.sample_x(), workload["clients"]) for s, d in enumerate(data)
    ]
    return alg, data, states


def separate(alg: fb.Algorithm, data: list, states: list, executor: str, batch: int) -> Callable:
    """One round of one seed's run per call, cycling over the seeds."""
    round_fn = fb.make_round(alg, executor=executor, batch_size=batch)
    live, calls = list(states), [0]

    def step() -> Any:
        s = calls[0] % len(live)
        calls[0] += 1
        live[s], _ = round_fn(live[s], data[s], jax.random.key(calls[0]))
        return live[s]

    return step


def batched(alg: fb.Algorithm, data: list, states: list, runs: int, batch: int) -> Callable:
    """One round of ``runs`` seeds batched per call."""
    round_fn = fb.vmap_runs(alg, batch_size=batch)
    train = fb.stack_runs(data[:runs], "training data")
    live, calls = [fb.stack_runs(states[:runs], "states")], [0]

    def step() -> Any:
        calls[0] += 1
        keys = jax.random.split(jax.random.key(calls[0]), runs)
        live[0], _ = round_fn(live[0], train, keys)
        return live[0]

    return step


def measure(
    runs: list[int],
    rounds: int,
    executors: list[str],
    work: dict | None = None,
    deadline: float | None = None,
) -> dict:
    """Every program's first call and median timed call, per-run times and speedups. Past
    ``deadline`` (a ``time.perf_counter()`` value) no program starts and timing stops, keeping
    what was measured (the skipped programs are listed)."""
    work = dict(WORKLOAD, **(work or {}))
    alg, data, states = workload(work, max(runs))
    batch = work["batch_size"]
    programs = {f"separate/{e}": separate(alg, data, states, e, batch) for e in executors}
    programs.update({f"batched/{s}": batched(alg, data, states, s, batch) for s in runs})
    late = lambda: deadline is not None and time.perf_counter() > deadline  # noqa: E731
    first: dict[str, float] = {}
    for name, fn in programs.items():
        if not late():
            first[name] = timed(fn)
    times: dict[str, list[float]] = {name: [] for name in first}
    for r in range(rounds):
        if r and late():
            break
        for name in first:
            times[name].append(timed(programs[name]))
    out: dict[str, Any] = dict(workload=work, backend=jax.default_backend(), programs={})
    out["skipped"] = [name for name in programs if name not in first]
    for name, ts in times.items():
        per = 1 if name.startswith("separate") else int(name.split("/")[1])
        median = statistics.median(ts)
        out["programs"][name] = dict(
            first_call_s=first[name], call_s=median, calls_s=ts, per_run_round_s=median / per
        )
    alone = {e: out["programs"].get(f"separate/{e}") for e in executors}
    for name, entry in out["programs"].items():
        if name.startswith("batched"):
            entry["speedup"] = {
                e: a["per_run_round_s"] / entry["per_run_round_s"] for e, a in alone.items() if a
            }
    return out


def table(result: dict) -> str:
    """The measurement as a text table."""
    lines = [f"{'program':18s} {'first s':>8s} {'call s':>8s} {'s/run-round':>12s}  speedup"]
    for name, e in result["programs"].items():
        speed = ", ".join(f"{k} {v:.2f}x" for k, v in e.get("speedup", {}).items())
        times = f"{e['first_call_s']:8.2f} {e['call_s']:8.3f} {e['per_run_round_s']:12.3f}"
        lines.append(f"{name:18s} {times}  {speed}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="1,2,4", help="batch sizes S, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per program")
    parser.add_argument("--executors", default="sequential,vmap", help="separate runs' executors")
    parser.add_argument("--out", default=DEFAULT_OUT, help="the JSON file to write")
    args = parser.parse_args(argv)
    runs = [int(s) for s in args.runs.split(",")]
    result = measure(runs, args.rounds, args.executors.split(","))
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
