"""Rounds per second of the example Flower App deployed (a SuperLink and 2 SuperNodes on
127.0.0.1, ``flwr run``) next to the same algorithm's in-process rounds (``make_round``,
sequential executor), on the digits split in 2 partitions. Round 1 (compilation, and for the
deployment process starts) is reported apart; the rate is over the later rounds.

    python benchmarks/flower_overhead.py --rounds 5 --algorithm fedbn
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "examples" / "flower_app"
sys.path[:0] = [str(ROOT / "tests"), str(APP)]

from fedjax_bn_app.task import algorithm, load_data, sample_x  # noqa: E402
from flower_harness import federation, flwr_run  # noqa: E402

import fedjax_bn as fb  # noqa: E402
from fedjax_bn.data import ClientArrays  # noqa: E402
from fedjax_bn.flower.server import round_key  # noqa: E402


def in_process(config: dict, rounds: int) -> list[float]:
    """Seconds of each in-process round."""
    alg = algorithm(config)
    parts = [load_data({"partition-id": i, "num-partitions": 2}, config) for i in range(2)]
    n = [len(y) for _, y in parts]
    pad = max(n)
    x = np.stack([np.pad(x, [(0, pad - len(x))] + [(0, 0)] * 3) for x, _ in parts])
    y = np.stack([np.pad(y, (0, pad - len(y))) for _, y in parts])
    train = ClientArrays(x=jax.numpy.asarray(x), y=jax.numpy.asarray(y), n=jax.numpy.asarray(n))
    state = alg.init(jax.random.key(0), sample_x(), 2)
    step = fb.make_round(alg, executor="sequential", batch_size=int(config["batch-size"]))
    times = []
    for r in range(rounds):
        t = time.perf_counter()
        state, _ = step(state, train, round_key(0, r))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    return times


def deployed(config: dict, rounds: int) -> list[float]:
    """Seconds of each deployed round, as the ServerApp reports them."""
    overrides = " ".join(
        f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in config.items()
    )
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with federation(Path(tmp), 2, env) as run_env:
            log = flwr_run(APP, run_env, f"{overrides} num-server-rounds={rounds}", timeout=900)
    return [float(s) for s in re.findall(r"seconds ([0-9.]+)", log)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--algorithm", default="fedbn")
    args = parser.parse_args()
    config = {"algorithm": args.algorithm, "lr": 0.05, "batch-size": 32, "examples-per-client": 0}
    for name, fn in (("in-process", in_process), ("deployed", deployed)):
        times = fn(config, args.rounds)
        rest = times[1:]
        rate = len(rest) / sum(rest) if rest else float("nan")
        print(
            f"{name}: round 1 {times[0]:.2f} s, later rounds {rate:.2f} rounds/s "
            f"({', '.join(f'{t:.2f}' for t in rest)} s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
