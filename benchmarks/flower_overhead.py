"""Rounds per second of one workload run four ways in one window: fedjax_bn in-process
(``make_round``, sequential executor), the fedjax_bn example App deployed (a SuperLink and 2
SuperNodes on 127.0.0.1, ``flwr run``) without and with jax's persistent compilation cache,
and the peers' baseline, torch + Flower's FedAvg (``benchmarks/flower_torch_app``) deployed
the same way from a torch environment of its own.

The workload: the digits split in 2 partitions (~720 training images each, written once to
``.npz`` files that both apps' nodes read through their ``data-path`` node config), FedAvg,
batch 32, one local epoch; ``--model reference`` is ``benchmarks/torch_reference.py``'s
SeedCNN 32/64 + FC 128 with Adam 5e-4 and coupled weight decay 1e-4 in both frameworks.
Round 1 (process starts, compilation, fedjax_bn's size query) is reported apart; the rate is
over the later rounds, and each rate's ratio to torch + Flower's is printed.

    python3 -m venv /work/torchvenv && /work/torchvenv/bin/pip install torch flwr==1.42.0 numpy
    python benchmarks/flower_overhead.py --rounds 5 --torch-bin /work/torchvenv/bin
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
TORCH_APP = ROOT / "benchmarks" / "flower_torch_app"
sys.path[:0] = [str(ROOT / "tests"), str(APP)]

from fedjax_bn_app.task import algorithm, load_data, sample_x  # noqa: E402
from flower_harness import federation, flwr_run  # noqa: E402

import fedjax_bn as fb  # noqa: E402
from fedjax_bn.data import ClientArrays, load_digits  # noqa: E402
from fedjax_bn.flower.server import round_key  # noqa: E402

NODES = 2


def write_partitions(folder: Path) -> list[str]:
    """The digits' training split in ``NODES`` partitions, one ``.npz`` each; node configs."""
    x, y, _, _ = load_digits(seed=0)
    configs = []
    parts = zip(np.array_split(x, NODES), np.array_split(y, NODES), strict=True)
    for i, (xi, yi) in enumerate(parts):
        np.savez(folder / f"part{i}.npz", x=xi, y=yi)
        configs.append(f'data-path="{folder / f"part{i}.npz"}" partition-id={i}')
    return configs


def in_process(config: dict, rounds: int, folder: Path) -> list[float]:
    """Seconds of each in-process round on the same partitions."""
    alg = algorithm(config)
    parts = [load_data({"data-path": str(folder / f"part{i}.npz")}, config) for i in range(NODES)]
    n = [len(y) for _, y in parts]
    pad = max(n)
    x = np.stack([np.pad(x, [(0, pad - len(x))] + [(0, 0)] * 3) for x, _ in parts])
    y = np.stack([np.pad(y, (0, pad - len(y))) for _, y in parts])
    train = ClientArrays(x=jax.device_put(x), y=jax.device_put(y), n=jax.device_put(np.int32(n)))
    state = alg.init(jax.random.key(0), sample_x(), NODES)
    step = fb.make_round(alg, executor="sequential", batch_size=int(config["batch-size"]))
    times = []
    for r in range(rounds):
        t = time.perf_counter()
        state, _ = step(state, train, round_key(0, r))
        jax.block_until_ready(state)
        times.append(time.perf_counter() - t)
    return times


def deployed(app: Path, overrides: str, configs: list[str], env: dict, bindir: Path | None):
    """Seconds of each deployed round, as the ServerApp prints them."""
    extra = {} if bindir is None else {"bindir": bindir}
    with (
        tempfile.TemporaryDirectory() as tmp,
        federation(Path(tmp), NODES, env, node_configs=configs, **extra) as run_env,
    ):
        log = flwr_run(app, run_env, overrides, timeout=1500, **extra)
    return [float(s) for s in re.findall(r"seconds ([0-9.]+)", log)]


def rate(times: list[float]) -> float:
    """Rounds per second over the rounds after the first."""
    rest = times[1:]
    return len(rest) / sum(rest) if rest else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--algorithm", default="fedavg")
    parser.add_argument("--model", default="reference", choices=("small", "reference"))
    parser.add_argument("--torch-bin", type=Path, help="bin/ of a venv with torch and flwr")
    args = parser.parse_args()
    config = {"algorithm": args.algorithm, "model": args.model, "lr": 0.05, "batch-size": 32}
    config["examples-per-client"] = 0
    common = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in config.items())
    common += f" num-server-rounds={args.rounds}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cache:
        folder = Path(tmp)
        configs = write_partitions(folder)
        runs = {
            "fedjax_bn in-process": lambda: in_process(config, args.rounds, folder),
            "fedjax_bn deployed, no compilation cache": lambda: deployed(
                APP,
                f"{common} compilation-cache=false",
                configs,
                {**env, "FEDJAX_BN_COMPILATION_CACHE": "0"},
                None,
            ),
            "fedjax_bn deployed, compilation cache": lambda: deployed(
                APP,
                f"{common} compilation-cache=true",
                configs,
                {**env, "FEDJAX_BN_COMPILATION_CACHE": cache},
                None,
            ),
        }
        if args.torch_bin is not None:
            runs["torch + Flower deployed"] = lambda: deployed(
                TORCH_APP, f"num-server-rounds={args.rounds}", configs, env, args.torch_bin
            )
        for name, run in runs.items():
            times = run()
            results[name] = times
            print(
                f"{name}: round 1 {times[0]:.2f} s, later rounds {rate(times):.3f} rounds/s "
                f"({', '.join(f'{t:.2f}' for t in times[1:])} s)",
                flush=True,
            )
    base = results.get("torch + Flower deployed")
    if base:
        for name, times in results.items():
            print(f"{name}: {rate(times) / rate(base):.2f}x torch + Flower's rounds/s")


if __name__ == "__main__":
    main()
