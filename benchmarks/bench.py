"""Benchmark of the executors against a plain centralized train step (a script, not a test).

For each model size and cohort, it times one plain jitted train step of the same model, batch
and optimizer (the yardstick), then a federated round of C clients x S local steps with each
executor, all in one process and interleaved: each timed round follows a yardstick timing. It
reports seconds per round, examples per second, the federated overhead ratio ``round time /
(real client-steps x yardstick step)`` from the fastest round over the fastest yardstick step
(minima are robust to other load on the machine; the same numbers as the s/round column) and as
the median of the per-pair ratios, the padded fraction of lockstep client-steps, the first
(compiling) round, and peak memory (host RSS; device memory where the backend reports it).
JSON plus a table:

    python -m benchmarks.bench                       # default matrix (~9 minutes on 2 CPUs)
    python -m benchmarks.bench --cases digits:10:5 --executors auto,vmap --repeats 10
    python -m benchmarks.bench --cases cifar:100:5,digits:1000:5 --executors auto,vmap,chunked

A case is ``model:clients:steps[:spread]`` (models: ``digits`` 8x8x1, ``fmnist`` 28x28x1,
``cifar`` 32x32x3, all SeedCNN widths (32, 64), hidden 128); a spread of 0.5 draws client sizes
in [0.5, 1] x S x B, so lockstep executors pad. An executor is
``name[/kK][/gG][/sN][/tT][/scan|/unroll]``: ``chunked/k25`` runs chunks of 25 clients,
``vmap/g4`` groups clients into 4 groups of similar size to cut the padding, ``sequential/s5``
unrolls 5 steps per jitted call, ``sequential/t1`` runs its clients from one host thread
(default: 2 on a CPU with 2+ cores), ``vmap/scan`` scans local steps.

Population mode (``--population``): ``benchmarks/population.py``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
import psutil

import fedjax_bn as fb
from fedjax_bn.data import ClientArrays, stack_clients
from fedjax_bn.execution import choose_executor, make_round

DEFAULT_OUT = "results/bench.json"
SHAPES = {"digits": (8, 8, 1), "fmnist": (28, 28, 1), "cifar": (32, 32, 3)}
# The default matrices: case -> (executors, timed repeats). CPU: ~6 minutes on 2 cores.
CPU_CASES = {
    "digits:10:5": ("auto,sequential,sequential/s5,vmap,vmap/scan,chunked/k5,sharded", 10),
    "digits:100:5": ("auto,vmap", 3),
    "digits:100:5:0.5": ("auto,vmap,vmap/g4", 3),
    "digits:1000:2": ("auto", 2),
    "cifar:10:2": ("auto,vmap", 3),
    "cifar:100:2": ("auto", 3),
}
ACCEL_CASES = {
    "digits:10:5": ("auto,sequential,vmap,chunked/k5,sharded", 10),
    "digits:100:5": ("auto,sequential,vmap,chunked/k25,sharded", 10),
    "digits:100:5:0.5": ("auto,vmap,vmap/g4", 10),
    "digits:1000:5": ("auto,vmap,chunked/k250,sharded", 5),
    "cifar:10:5": ("auto,sequential,vmap,chunked/k5,sharded", 10),
    "cifar:100:5": ("auto,sequential,vmap,chunked/k25,sharded", 5),
    "cifar:1000:5": ("auto,vmap,chunked/k250,sharded", 3),
}


def model_and_tx() -> tuple[fb.SeedCNN, optax.GradientTransformation]:
    """The benchmarked model and optimizer (the bug report's setting)."""
    model = fb.SeedCNN(num_classes=10, widths=(32, 64), hidden=128)
    return model, optax.chain(optax.add_decayed_weights(1e-4), optax.adam(5e-4))


def synthetic_clients(
    shape: tuple[int, ...], clients: int, steps: int, batch: int, spread: float, seed: int = 0
) -> ClientArrays:
    """uint8 images, ``steps * batch`` examples per client (fewer, down to ``1 - spread``)."""
    rng = np.random.default_rng(seed)
    full = steps * batch
    sizes = (
        np.full(clients, full)
        if spread == 0
        else rng.integers(full * (1 - spread), full + 1, clients)
    )
    sizes = np.maximum(sizes, 1)
    xs = [rng.integers(0, 256, (n, *shape), dtype=np.uint8) for n in sizes]
    ys = [rng.integers(0, 10, n).astype(np.int32) for n in sizes]
    return stack_clients(xs, ys)


def yardstick(model: Any, tx: Any, train: ClientArrays, batch: int) -> Callable[[int], Any]:
    """``run(k)``: k plain jitted train steps (train=True, mutable batch_stats, no masks)."""
    x, y = train.x[0, :batch], train.y[0, :batch]
    variables = model.init(jax.random.key(0), x[:1], train=False)
    carry = [variables["params"], variables["batch_stats"], tx.init(variables["params"])]

    @jax.jit
    def step(params, batch_stats, opt_state, x_B, y_B):
        def loss(p):
            logits, new = model.apply(
                {"params": p, "batch_stats": batch_stats}, x_B, train=True, mutable=["batch_stats"]
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, y_B).mean(), new

        grads, new = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new["batch_stats"], opt_state

    def run(k: int) -> Any:
        for _ in range(k):
            carry[:] = step(*carry, x, y)
        return carry

    return run


def timed(fn: Callable[[], Any]) -> float:
    """Wall seconds of ``fn()`` until its outputs are ready."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def device_peak_bytes() -> int | None:
    """Peak device memory where the backend reports it (GPU/TPU), else None."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else int(stats.get("peak_bytes_in_use", 0))


def host_peak_mib() -> float:
    """The process's peak resident memory so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def executor_options(token: str) -> tuple[str, dict[str, Any]]:
    """``vmap/g4/k25/scan`` -> ("vmap", {"num_groups": 4, "chunk_size": 25, "loop": "scan"});
    ``sequential/s2/t1`` -> ("sequential", {"steps_per_call": 2, "client_threads": 1})."""
    name, *opts = token.split("/")
    keys = {"g": "num_groups", "k": "chunk_size", "s": "steps_per_call", "t": "client_threads"}
    return name, {
        "loop" if o in ("scan", "unroll") else keys[o[0]]: o
        if o in ("scan", "unroll")
        else int(o[1:])
        for o in opts
    }


def bench_case(
    case: str, executors: Sequence[str], repeats: int, args: argparse.Namespace
) -> list[dict]:
    """Rows for one ``model:clients:steps[:spread]`` case: the yardstick, then each executor."""
    name, clients, steps, *rest = case.split(":")
    clients, steps, batch = int(clients), int(steps), args.batch_size
    spread = float(rest[0]) if rest else args.spread
    model, tx = model_and_tx()
    train = synthetic_clients(SHAPES[name], clients, steps, batch, spread)
    sizes = np.asarray(train.n)
    real_steps = int(sum(-(-int(n) // batch) for n in sizes))
    examples = int(sizes.sum())
    plain = yardstick(model, tx, train, batch)
    # Like for like: by default the yardstick runs as many steps as a round, so both timings
    # span the same stretch of (shared, noisy) machine time; a short burst's minimum runs low.
    ystep = min(args.yard_steps or real_steps, real_steps)
    timed(lambda: plain(3))
    alg = fb.fedavg(model, tx)
    rounds, states, first = {}, {}, {}
    for ex in executors:
        executor, opts = executor_options(ex)
        rounds[ex] = make_round(alg, executor=executor, batch_size=batch, **opts)
        states[ex] = alg.init(jax.random.key(0), train.x[0, :1], clients)
        first[ex] = timed(lambda ex=ex: run_round(rounds, states, ex, train, 0))
    times, yards = paired_timings(plain, ystep, rounds, states, train, repeats, start=1)
    yard = [t for ex in executors for t in yards[ex]]
    y = min(yard)
    rows = [
        dict(
            model=name,
            clients=clients,
            steps=steps,
            spread=spread,
            executor="yardstick",
            runs="plain step",
            round_s=y * real_steps,
            examples_per_s=batch / y,
            overhead=1.0,
            step_ms=y * 1e3,
            step_ms_median=float(np.median(yard)) * 1e3,
        )
    ]
    for ex in executors:
        t = min(times[ex])
        rows.append(
            dict(
                model=name,
                clients=clients,
                steps=steps,
                spread=spread,
                executor=ex,
                runs=rounds[ex].executor,
                round_s=t,
                round_s_median=float(np.median(times[ex])),
                first_round_s=first[ex],
                examples_per_s=examples / t,
                overhead=t / (real_steps * y),
                overhead_median=paired_median_ratio(times[ex], yards[ex], real_steps),
                padded_fraction=rounds[ex].padded_fraction(train),
                host_rss_mib=psutil.Process().memory_info().rss / 2**20,
                host_peak_mib=host_peak_mib(),
                device_peak_bytes=device_peak_bytes(),
            )
        )
    return rows


def paired_median_ratio(rounds_s: Sequence[float], steps_s: Sequence[float], steps: int) -> float:
    """Median over timed pairs of ``round / (steps x the yardstick step timed just before it)``:
    load that slows both halves of a pair cancels out."""
    return float(np.median(np.asarray(rounds_s) / (steps * np.asarray(steps_s))))


def paired_timings(
    plain: Callable[[int], Any],
    ystep: int,
    rounds: dict,
    states: dict,
    train: ClientArrays,
    repeats: int,
    start: int,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``repeats`` timed rounds of each of ``rounds`` (round keys ``start``, ``start + 1``, ...),
    each paired with a yardstick timing of ``ystep`` steps just before it: per-round seconds
    and per-step yardstick seconds (the median ratio uses the pairs)."""
    times: dict[str, list[float]] = {ex: [] for ex in rounds}
    yards: dict[str, list[float]] = {ex: [] for ex in rounds}
    for r in range(repeats):
        for ex in rounds:
            yards[ex].append(timed(lambda: plain(ystep)) / ystep)
            times[ex].append(
                timed(lambda ex=ex, r=r: run_round(rounds, states, ex, train, start + r))
            )
    return times, yards


def run_round(rounds: dict, states: dict, ex: str, train: ClientArrays, r: int) -> Any:
    """One round of executor ``ex``; its state carries over to the next."""
    states[ex], result = rounds[ex](states[ex], train, jax.random.key(r))
    return states[ex], result


# Population mode: a cohort of K clients of a population of N per round, client state on the
# device or the host; only the cohort's state and data rows move each round.
ALGORITHMS: dict[str, Callable[[Any, Any], Any]] = {
    "fedbn": lambda model, tx: fb.fedbn(model, tx),  # per-client BN affine and statistics
    "fedavg": lambda model, tx: fb.fedavg(model, tx),  # no client state
    "fedbn_opt": lambda model, tx: fb.fedbn(model, tx, persist_client_optimizer=True),
    "scaffold": lambda model, tx: fb.scaffold(model, tx, lr=5e-4),  # a model-sized control
}
COLUMNS = (  # (header, row key, format)
    ("model", "model", "7"),
    ("C", "clients", ">5"),
    ("S", "steps", ">3"),
    ("spread", "spread", ">6.2f"),
    ("executor", "executor", "13"),
    ("runs", "runs", "11.11"),
    ("s/round", "round_s", ">9.3f"),
    ("examples/s", "examples_per_s", ">11.0f"),
    ("overhead", "overhead", ">8.3f"),
    ("(median)", "overhead_median", ">8.3f"),
    ("padded", "padded_fraction", ">6.3f"),
    ("1st s", "first_round_s", ">7.2f"),
    ("peak MiB", "host_peak_mib", ">8.0f"),
)


def table(rows: Sequence[dict], columns: Sequence[tuple] = COLUMNS, markdown: bool = False) -> str:
    """A readable fixed-width table of the rows (blank where a row has no value); with
    ``markdown`` the same cells as a markdown pipe table."""

    def cell(value: Any, fmt: str) -> str:
        width = int(fmt.lstrip("<>").split(".")[0] or 0)
        return " " * width if value is None else format(value, fmt)

    def line(cells: Sequence[str]) -> str:
        return f"| {' | '.join(cells)} |" if markdown else " ".join(cells)

    heads = [
        format(h, f"{'>' if f[:1] == '>' else '<'}{f.lstrip('<>').split('.')[0]}")
        for h, _, f in columns
    ]
    head = line(heads)
    rule = line(["-" * len(h) for h in heads]) if markdown else "-" * len(head)
    lines = [head, rule]
    lines += [line([cell(r.get(k), f) for _, k, f in columns]) for r in rows]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cases", help="comma list of model:clients:steps (default: a matrix)")
    p.add_argument("--executors", help="comma list (default: per case, see CPU_CASES)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, help="timed rounds per executor (default: per case)")
    p.add_argument(
        "--yard-steps", type=int, default=0, help="yardstick steps per timing (0: a round's)"
    )
    p.add_argument("--spread", type=float, default=0.0, help="default case spread")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    g = p.add_argument_group("population mode (--population)")
    g.add_argument(
        "--population",
        action="store_true",
        help="cohorts of large populations, client state on device vs host (JSON, CSV, "
        "markdown; default --out results/bench_population.json)",
    )
    g.add_argument("--population-sizes", default="1000,10000,100000", help="comma list of N")
    g.add_argument("--cohorts", default="50", help="comma list of cohort sizes K")
    g.add_argument("--placements", default="device,host", help="client state: device,host,auto")
    g.add_argument("--algorithms", default="fedbn", help=f"comma list of {','.join(ALGORITHMS)}")
    g.add_argument("--executor", default="auto", help="the executor running each cohort")
    g.add_argument("--client-examples", type=int, default=64, help="images per client")
    g.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first")
    g.add_argument(
        "--no-full-reference",
        dest="full_reference",
        action="store_false",
        help="skip the full-participation reference rows (K clients, every round)",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.population:
        from benchmarks.population import population_main  # it builds on this module

        return population_main(args)
    backend = jax.default_backend()
    matrix = CPU_CASES if backend == "cpu" else ACCEL_CASES
    cases = args.cases.split(",") if args.cases else list(matrix)
    rows: list[dict] = []
    start = time.perf_counter()
    for case in cases:
        default, repeats = matrix.get(case, ("auto,sequential,vmap", 5))
        executors = (args.executors or default).split(",")
        rows += bench_case(case, executors, args.repeats or repeats, args)
        print(table(rows[-len(executors) - 1 :]), flush=True)
    meta = dict(
        backend=backend,
        devices=[str(d) for d in jax.devices()],
        cpu_count=psutil.cpu_count(),
        jax=jax.__version__,
        auto_picks={c: choose_executor(int(c.split(":")[1])) for c in cases},
        yardstick="one plain jitted step: same model (train=True, mutable batch_stats), batch "
        "and optimizer, no masks; overhead = round time / (real client-steps x its time)",
        args=vars(args),
        seconds=time.perf_counter() - start,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"\n{table(rows)}\n\nbackend {backend}, {meta['seconds']:.0f} s; JSON: {out}")


if __name__ == "__main__":
    main()
