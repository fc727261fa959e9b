"""What a researcher waits for: a short run as a whole fresh process, cold and warm cache.

    python -m benchmarks.startup                       # JAX only
    python -m benchmarks.startup --torch-python /tmp/torchvenv/bin/python  # and torch's loop
    python -m benchmarks.startup --peers --torch-python /tmp/torchvenv/bin/python

``--peers``: the peers' workload instead (SeedCNN 32/64 without pooling, both sides starting
from torch's initial weights, the JAX side through ``fedjax_bn.interop.from_torch``, timed as
``from_torch_s``).

The workload: the embedded digits, 10 clients Dirichlet 0.5, SeedCNN 32/64 + FC
128, Adam 5e-4 + coupled weight decay 1e-4, batch 32, one local epoch, FedAvg, 30 rounds, then
the global test accuracy. The parent writes the clients to an ``.npz`` once; every child
process (JAX here, torch in ``benchmarks/torch_reference.py``) loads that same file, so both
sides pay the same data cost and train on the same clients.

Per JAX process it reports: import seconds, compiled programs and compile seconds (from
``jax.monitoring``: XLA compiles, persistent-cache hits, tracing and lowering), time to the end
of the first round, the first round, the median later round, the plain-step yardstick (one
plain jitted train step, measured in the same process after the run), and the whole-process
wall (from the parent's ``Popen`` to the end of the workload). The figure to drive down is
``whole / (rounds x yardstick round)``, a yardstick round being the round's real steps times
the plain step. ``--steps`` adds the plain step at 8x8, 28x28 and 32x32 (JAX default XLA
flags and ``--xla_cpu_use_xnnpack=true``; torch with ``--torch-python``), and JAX's effective
step with two independent steps in flight from two host threads (the sequential executor's
two client lanes: per-step time of the pair). Results go to
``--out`` as JSON and print as markdown tables. A benchmark, not a test: run it on a quiet
machine and read ratios, not seconds.
"""

from __future__ import annotations

import time

START = time.time()  # the child's clock starts before any heavy import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from benchmarks.plain_steps import STEP_CASES, XNNPACK  # noqa: E402

# Whole process against the torch loop, same window (median over processes): a cold process no
# slower, a warm one at least 1.5x faster (docs/startup.md, "The targets").
TARGETS = {"jax cold": 1.0, "jax warm": 1.5}
TORCH_SCRIPT = Path(__file__).with_name("torch_reference.py")


def write_workload(path: Path) -> None:
    """The digits clients (seed 0) and test set as plain arrays in one ``.npz``."""
    import numpy as np

    from fedjax_bn.data import digits_label_skew

    data = digits_label_skew(10, 0.5, seed=0)
    n = np.asarray(data.train.n)
    arrays: dict[str, Any] = {"num_clients": len(n), "num_classes": data.num_classes}
    for c, n_c in enumerate(n):
        arrays[f"x{c}"] = np.asarray(data.train.x[c, :n_c])
        arrays[f"y{c}"] = np.asarray(data.train.y[c, :n_c])
    n_test = np.asarray(data.test.n)
    arrays["x_test"] = np.concatenate(
        [np.asarray(data.test.x[c, :k]) for c, k in enumerate(n_test)]
    )
    arrays["y_test"] = np.concatenate(
        [np.asarray(data.test.y[c, :k]) for c, k in enumerate(n_test)]
    )
    np.savez(path, **arrays)


class CompileLog:
    """Counts and seconds of jax's compile events in this process (``jax.monitoring``)."""

    EVENTS = {
        "/jax/core/compile/backend_compile_duration": "compile",
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    }

    def __init__(self) -> None:
        import jax

        self.counts = {v: 0 for v in self.EVENTS.values()} | {"cache_hits": 0}
        self.seconds = {v: 0.0 for v in self.EVENTS.values()}
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)

    def _duration(self, event: str, duration: float, **_: Any) -> None:
        if event in self.EVENTS:
            self.counts[self.EVENTS[event]] += 1
            self.seconds[self.EVENTS[event]] += duration

    def _event(self, event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            self.counts["cache_hits"] += 1

    def summary(self) -> dict[str, Any]:
        """Programs (backend compiles, cache hits included), how many XLA really compiled,
        and the seconds of compiling (or loading), tracing and lowering."""
        c, s = self.counts, self.seconds
        return {
            "programs": c["compile"],
            "compiled": c["compile"] - c["cache_hits"],
            "cache_hits": c["cache_hits"],
            "compile_s": s["compile"],
            "trace_s": s["trace"],
            "lower_s": s["lower"],
        }


def run_child(workload: str, rounds: int, init: str = "") -> dict[str, Any]:
    """The JAX side of one process: the workload, then the yardstick (not in ``end``).
    ``init``: torch's initial state dict (``.npz``) to start from, through ``from_torch``, with
    the peers' model (no pooling)."""
    import jax
    import numpy as np
    import optax

    import fedjax_bn as fb
    from fedjax_bn.data import stack_clients
    from fedjax_bn.execution.plan import real_steps

    fb.enable_compilation_cache()  # the directory FEDJAX_BN_COMPILATION_CACHE names
    t_import = time.time()
    log = CompileLog()
    data = np.load(workload)
    num = int(data["num_clients"])
    xs = [data[f"x{c}"] for c in range(num)]
    ys = [data[f"y{c}"] for c in range(num)]
    train = stack_clients(xs, ys)
    t_data = time.time()
    model = fb.SeedCNN(
        num_classes=int(data["num_classes"]), widths=(32, 64), hidden=128, pool=not init
    )
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(5e-4))
    alg = fb.fedavg(model, tx)
    start = jax.random.key(0)
    if init:
        from fedjax_bn.interop import from_torch

        start = from_torch(model, dict(np.load(init)), sample_x=train.x[0, :1])
    t_init = time.time()
    state = alg.init(start, train.x[0, :1], num)
    round_fn = fb.make_round(alg, executor="auto", batch_size=32)
    key = jax.random.key(1)
    round_s = []
    for _ in range(rounds):
        start = time.perf_counter()
        key, round_key = jax.random.split(key)
        state, _ = round_fn(state, train, round_key)
        jax.block_until_ready(state)
        round_s.append(time.perf_counter() - start)
        if len(round_s) == 1:
            t_first = time.time()
    variables = fb.global_variables(alg, state, train.n)
    accuracy = fb.evaluate_model(model, variables, data["x_test"], data["y_test"]).accuracy
    end = time.time()
    compiles = log.summary()

    from benchmarks.bench import timed, yardstick

    steps = sum(real_steps(len(y), 32, 1) for y in ys)
    run = yardstick(model, tx, train, 32)
    run(3)
    step_s = min(timed(lambda: run(steps)) for _ in range(5)) / steps
    return {
        "start": START,
        "import_s": t_import - START,
        "data_s": t_data - t_import,
        "from_torch_s": t_init - t_data if init else None,
        "to_first_round_s": t_first - START,
        "first_round_s": round_s[0],
        "later_round_s": statistics.median(round_s[1:]) if rounds > 1 else None,
        "rounds_s": sum(round_s),
        "end": end,
        "steps_per_round": steps,
        "step_s": step_s,
        "test_accuracy": accuracy,
        **compiles,
    }


def spawn(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float, dict]:
    """Run a child; returns (parent start time, its wall seconds, its last JSON line)."""
    start = time.time()
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    wall = time.time() - start
    if out.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return start, wall, json.loads(out.stdout.strip().splitlines()[-1])


def write_init(torch_python: str, workload: Path, out: str) -> None:
    """The peers' initial weights: torch's own init when a torch python is given, else a
    torch-layout state dict of random arrays (``benchmarks/from_torch_cost.py``'s)."""
    if torch_python:
        spawn([torch_python, str(TORCH_SCRIPT), "init", "--data", str(workload), "--no-pool",
               "--out", out])  # fmt: skip
    else:
        from benchmarks.from_torch_cost import write_state_dict

        write_state_dict(Path(out))


def import_profile() -> dict[str, Any]:
    """``python -X importtime -c "import fedjax_bn"``: the total and the slowest top-level
    packages (cumulative microseconds -> seconds)."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import fedjax_bn"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ | {"FEDJAX_BN_COMPILATION_CACHE": "0"},
    )
    top: dict[str, float] = {}
    for line in out.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and not m.group(3):  # a top-level import
            top[m.group(4)] = int(m.group(2)) / 1e6
    slow = sorted(top.items(), key=lambda kv: -kv[1])[:6]
    return {"total_s": sum(top.values()), "slowest": slow}


def jax_process(
    workload: Path, rounds: int, cache: Path, flags: str, init: str = ""
) -> dict[str, Any]:
    """One fresh JAX process on the workload, with compilation cache ``cache``."""
    env = os.environ | {"FEDJAX_BN_COMPILATION_CACHE": str(cache)}
    if flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
    args = [sys.executable, "-m", "benchmarks.startup", "--child", str(workload)]
    args += ["--rounds", str(rounds)] + (["--init", init] if init else [])
    start, _, res = spawn(args, env)
    res["whole_s"] = res["end"] - start
    res["ratio"] = res["whole_s"] / (rounds * res["steps_per_round"] * res["step_s"])
    return res


def torch_process(python: str, workload: Path, rounds: int, init: str = "") -> dict[str, Any]:
    """One fresh torch process on the workload; whole = its wall time."""
    peers = ["--no-pool", "--init", init] if init else []
    _, wall, res = spawn([python, str(TORCH_SCRIPT), "workload", "--data", str(workload),
                          "--rounds", str(rounds), *peers])  # fmt: skip
    rounds_s = res.pop("round_s")
    return res | {
        "whole_s": wall,
        "first_round_s": rounds_s[0],
        "later_round_s": statistics.median(rounds_s[1:]),
        "rounds_s": sum(rounds_s),
    }


PROCESS_COLUMNS = [
    ("run", "run", ""),
    ("import s", "import_s", ".2f"),
    ("from_torch s", "from_torch_s", ".2f"),
    ("programs", "programs", ""),
    ("compiled", "compiled", ""),
    ("compile s", "compile_s", ".2f"),
    ("trace+lower s", "trace_lower_s", ".2f"),
    ("to 1st round s", "to_first_round_s", ".2f"),
    ("1st round s", "first_round_s", ".2f"),
    ("later round s", "later_round_s", ".3f"),
    ("yardstick round s", "yardstick_round_s", ".3f"),
    ("whole s", "whole_s", ".2f"),
    ("whole / (R x yardstick)", "ratio", ".2f"),
    ("test acc", "test_accuracy", ".3f"),
]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="cold/warm process pairs")
    p.add_argument("--flags", default="", help="extra XLA_FLAGS for the JAX processes")
    p.add_argument("--torch-python", default="", help="a python with torch: adds torch's runs")
    p.add_argument("--steps", action="store_true", help="also time the plain step per image size")
    p.add_argument("--out", default="", help="write all results as JSON here")
    p.add_argument(
        "--peers",
        action="store_true",
        help="the peers' workload: SeedCNN without pooling, both sides from torch's initial\n"
        "weights (the JAX side through fedjax_bn.interop.from_torch)",
    )
    p.add_argument("--init", default="", help=argparse.SUPPRESS)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rounds < 2 or a.repeats < 1:
        p.error(f"--rounds must be >= 2 and --repeats >= 1, got {a.rounds} and {a.repeats}")
    if a.torch_python and not Path(a.torch_python).exists():
        p.error(f"--torch-python {a.torch_python} does not exist (a python with torch installed)")
    return a


def step_rows(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Plain step per case: JAX default flags, JAX + XNNPACK, torch (when given)."""
    rows: dict[str, dict[str, Any]] = {}
    args = [sys.executable, "-m", "benchmarks.plain_steps"]
    for label, flags in (("jax_ms", ""), ("jax_xnnpack_ms", XNNPACK)):
        env = os.environ | {"XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()}
        for r in spawn(args, env)[2]:
            rows.setdefault(r["case"], {"case": r["case"]})[label] = 1e3 * r["min_s"]
            if not flags:
                rows[r["case"]]["jax_2_threads_ms"] = 1e3 * r["pair_min_s"]
    if a.torch_python:
        cases = json.dumps(STEP_CASES)
        res = spawn([a.torch_python, str(TORCH_SCRIPT), "steps", "--cases", cases])[2]
        for r in res["steps"]:
            rows[r["case"]]["torch_ms"] = 1e3 * r["min_s"]
    for r in rows.values():
        if "torch_ms" in r:
            r["jax_over_torch"] = r["jax_ms"] / r["torch_ms"]
            r["xnnpack_over_torch"] = r["jax_xnnpack_ms"] / r["torch_ms"]
            r["2_threads_over_torch"] = r["jax_2_threads_ms"] / r["torch_ms"]
    return list(rows.values())


def main(argv: list[str] | None = None) -> None:
    """Parent: cold/warm JAX processes (and torch's), tables, JSON."""
    a = parse_args(argv)
    if a.child:
        print(json.dumps(run_child(a.child, a.rounds, a.init)))
        return
    from benchmarks.bench import table  # not in a child: its import time is measured

    results: dict[str, Any] = {"rounds": a.rounds, "flags": a.flags, "peers": a.peers}
    results["imports"] = import_profile()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workload = Path(tmp) / "workload.npz"
        write_workload(workload)
        init = str(Path(tmp) / "init.npz") if a.peers else ""
        if init:
            write_init(a.torch_python, workload, init)
        for i in range(a.repeats):
            cache = Path(tmp) / f"cache{i}"
            for run in ("cold", "warm"):
                r = jax_process(workload, a.rounds, cache, a.flags, init)
                r["run"] = f"jax {run}"
                r["yardstick_round_s"] = r["steps_per_round"] * r["step_s"]
                r["trace_lower_s"] = r["trace_s"] + r["lower_s"]
                rows.append(r)
                print(f"{r['run']}: whole {r['whole_s']:.2f} s, ratio {r['ratio']:.2f}", flush=True)
            if a.torch_python:
                t = torch_process(a.torch_python, workload, a.rounds, init) | {"run": "torch"}
                rows.append(t)
                print(f"torch: whole {t['whole_s']:.2f} s", flush=True)
    results["processes"] = rows
    print(f"\nimport fedjax_bn: {results['imports']['total_s']:.2f} s; slowest top-level:")
    for name, s in results["imports"]["slowest"]:
        print(f"  {s:.2f} s  {name}")
    print(f"\n{a.rounds} rounds, one row per fresh process\n")
    print(table(rows, PROCESS_COLUMNS, markdown=True))
    summary = {}
    for run in sorted({r["run"] for r in rows}):
        summary[run] = statistics.median(r["whole_s"] for r in rows if r["run"] == run)
    results["median_whole_s"] = summary
    if "torch" in summary:
        results["vs_torch"] = {}
        for run, target in TARGETS.items():
            ratio = summary["torch"] / summary[run]
            results["vs_torch"][run] = {"ratio": ratio, "target": target, "met": ratio >= target}
            verdict = f"target >= {target}x: {'met' if ratio >= target else 'NOT met'}"
            print(f"{run}: {ratio:.2f}x faster than torch end to end ({verdict})")
    if a.steps:
        results["steps"] = step_rows(a)
        print("\nplain train step, batch 32, fastest burst of 20 (ms)\n")
        cols = [("case", "case", ""), ("jax", "jax_ms", ".2f"), ("jax+xnnpack", "jax_xnnpack_ms",
                ".2f"), ("jax 2 in flight", "jax_2_threads_ms", ".2f"), ("torch", "torch_ms",
                ".2f"), ("jax/torch", "jax_over_torch", ".2f"), ("xnnpack/torch",
                "xnnpack_over_torch", ".2f"), ("2 in flight/torch", "2_threads_over_torch",
                ".2f")]  # fmt: skip
        print(table(results["steps"], cols, markdown=True))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
