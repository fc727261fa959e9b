"""A learning-rate x mu grid end to end: one runner process with ``--config.sweep.*`` against
the same runs as one runner process each (what a grid cost before hyperparameters were data).

    python -m benchmarks.sweep_cost                                  # 3x3, 30 rounds
    python -m benchmarks.sweep_cost --lrs 1e-4,1e-3 --mus 1e-3 --rounds 5   # a smaller grid
    python -m benchmarks.sweep_cost --parallel-runs 9 --out sweep.json  # + the grid batched
    python -m benchmarks.sweep_cost --cached-separate   # + one process per point, one cache

The workload: the runner's default study shrunk to the peers' (digits label skew, 10 clients,
SeedCNN 32/64 + FC 128, Adam + coupled L2 1e-4, batch 32, one seed) under FedProx, so both
``optim.lr`` and ``mu`` are swept. Both sides run ``python -m experiments.run`` cold (no
persistent compilation cache), evaluate every ``--eval-every`` rounds and write the same
histories, summary and plots; the figure is the wall of each side from ``Popen`` to exit and
their ratio, measured in one invocation. ``--parallel-runs S`` adds a third side: the sweep with
``--config.parallel_runs=S`` (S points trained as one batched federation, ``fb.vmap_runs``).
``--cached-separate`` a fourth: one process per point again, all sharing one persistent
compilation cache (the first fills it; the values are data, so the others compile nothing).
``--out`` writes every process's seconds as JSON. A benchmark, not a test: run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 2.0  # the grid in one process at least 2x faster end to end than a process per point


def runner_argv(out: Path, rounds: int, eval_every: int, *extra: str) -> list[str]:
    """The runner on the peers' workload under FedProx, one seed, no compilation cache."""
    return [
        sys.executable,
        "-m",
        "experiments.run",
        f"--config.out_dir={out}",
        "--config.settings=digits_label_skew",
        "--config.algorithms=fedprox",
        "--config.seeds=0",
        f"--config.rounds={rounds}",
        f"--config.eval_every={eval_every}",
        "--config.progress=False",
        "--config.compilation_cache=",
        *extra,
    ]


def timed(name: str, argv: list[str]) -> float:
    """Seconds from ``Popen`` to exit (output discarded; a failure raises), printed."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    print(f"{name}: {seconds:.1f} s", flush=True)
    return seconds


def separate_runs(args: argparse.Namespace, tmp: Path, cache: str = "") -> list[float]:
    """One runner process per grid point; ``cache``: a persistent compilation cache they share
    (the first process fills it), else none (every process cold)."""
    seconds = []
    for lr, mu in itertools.product(args.lrs.split(","), args.mus.split(",")):
        name = f"lr={lr} mu={mu} alone" + (", shared cache" if cache else "")
        argv = runner_argv(tmp / name.replace(" ", "_"), args.rounds, args.eval_every)
        argv += [f"--config.optim.lr={lr}", f"--config.mu={mu}"]
        argv += [f"--config.compilation_cache={cache}"] if cache else []
        seconds.append(timed(name, argv))
    return seconds


def report(args: argparse.Namespace, result: dict) -> None:
    """The sides' seconds and ratios, printed."""
    separate = result["separate_s"]
    n, sweep_s = len(separate), result["sweep_s"]
    print(f"grid {args.lrs} lr x {args.mus} mu, {args.rounds} rounds each ({n} runs)")
    print(f"one process with --config.sweep: {sweep_s:.1f} s")
    each = f"each {min(separate):.1f}-{max(separate):.1f} s"
    print(f"{n} processes, one run each:     {sum(separate):.1f} s ({each})")
    ratio = sum(separate) / sweep_s
    print(f"ratio (separate / sweep): {ratio:.2f}x (target >= {TARGET}x: ", end="")
    print("met)" if ratio >= TARGET else "NOT met)")
    if result["batched_s"] is not None:
        batched = result["batched_s"]
        print(f"one process, sweep + parallel_runs={args.parallel_runs}: {batched:.1f} s")
        print(f"ratio (separate / batched sweep): {sum(separate) / batched:.2f}x")
    if result["cached_separate_s"] is not None:
        cached = result["cached_separate_s"]
        later = f", then {min(cached[1:]):.1f}-{max(cached[1:]):.1f} s" if n > 1 else ""
        print(f"{n} processes sharing one compilation cache: {sum(cached):.1f} s")
        print(f"  (first {cached[0]:.1f} s{later})")
        print(f"ratio (separate / cached separate): {sum(separate) / sum(cached):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="1e-4,5e-4,1e-3")
    parser.add_argument("--mus", default="1e-3,1e-2,1e-1")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--parallel-runs", type=int, default=0, help="S > 1: also batched")
    parser.add_argument(
        "--cached-separate", action="store_true", help="also one process per point, one cache"
    )
    parser.add_argument("--out", default="", help="write the seconds here as JSON")
    args = parser.parse_args()
    grid = [f"--config.sweep.optim.lr={args.lrs}", f"--config.sweep.mu={args.mus}"]
    result: dict = {"batched_s": None, "cached_separate_s": None}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        sweep = runner_argv(tmp / "sweep", args.rounds, args.eval_every, *grid)
        result["sweep_s"] = timed("sweep", sweep)
        if args.parallel_runs > 1:
            batched = runner_argv(tmp / "batched", args.rounds, args.eval_every, *grid)
            batched.append(f"--config.parallel_runs={args.parallel_runs}")
            result["batched_s"] = timed(f"sweep, parallel_runs={args.parallel_runs}", batched)
        result["separate_s"] = separate_runs(args, tmp)
        if args.cached_separate:
            result["cached_separate_s"] = separate_runs(args, tmp, cache=str(tmp / "cache"))
    report(args, result)
    if args.out:
        Path(args.out).write_text(json.dumps(vars(args) | result, indent=1) + "\n")


if __name__ == "__main__":
    main()
