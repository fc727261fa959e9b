"""A learning-rate x mu grid end to end: one runner process with ``--config.sweep.*`` against
the same runs as one runner process each (what a grid cost before hyperparameters were data).

    python -m benchmarks.sweep_cost                                  # 3x3, 30 rounds
    python -m benchmarks.sweep_cost --lrs 1e-4,1e-3 --mus 1e-3 --rounds 5   # a smaller grid

The workload: the runner's default study shrunk to the peers' (digits label skew, 10 clients,
SeedCNN 32/64 + FC 128, Adam + coupled L2 1e-4, batch 32, one seed) under FedProx, so both
``optim.lr`` and ``mu`` are swept. Both sides run ``python -m experiments.run`` cold (no
persistent compilation cache), evaluate every ``--eval-every`` rounds and write the same
histories, summary and plots; the figure is the wall of each side from ``Popen`` to exit and
their ratio, measured in one invocation. A benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
import tempfile
import time
from pathlib import Path


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


def timed(argv: list[str]) -> float:
    """Seconds from ``Popen`` to exit (output discarded; a failure raises)."""
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="1e-4,5e-4,1e-3")
    parser.add_argument("--mus", default="1e-3,1e-2,1e-1")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=10)
    args = parser.parse_args()
    lrs, mus = args.lrs.split(","), args.mus.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        sweep_s = timed(
            runner_argv(
                Path(tmp) / "sweep",
                args.rounds,
                args.eval_every,
                f"--config.sweep.optim.lr={args.lrs}",
                f"--config.sweep.mu={args.mus}",
            )
        )
        separate = [
            timed(
                runner_argv(
                    Path(tmp) / f"lr{lr}_mu{mu}",
                    args.rounds,
                    args.eval_every,
                    f"--config.optim.lr={lr}",
                    f"--config.mu={mu}",
                )
            )
            for lr, mu in itertools.product(lrs, mus)
        ]
    n = len(separate)
    print(f"grid {len(lrs)} lr x {len(mus)} mu, {args.rounds} rounds each ({n} runs)")
    print(f"one process with --config.sweep: {sweep_s:.1f} s")
    each = f"each {min(separate):.1f}-{max(separate):.1f} s"
    print(f"{n} processes, one run each:     {sum(separate):.1f} s ({each})")
    print(f"ratio (separate / sweep): {sum(separate) / sweep_s:.2f}x")


if __name__ == "__main__":
    main()
