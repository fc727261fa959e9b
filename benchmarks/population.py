"""The population benchmark: ``python -m benchmarks.bench --population`` (a script, not a test).

Population mode: a cohort of K clients of a population of N each round (``make_round(...,
cohort_size=K, state_placement=...)``), N digits clients of ``--client-examples`` images, the
population's data on the host. Each row: s/round (median after the first and ``--warmup``
rounds), the overhead over the cohort's real steps x the yardstick (minima, and the paired
median), XLA compilations during the timed rounds, the client state's bytes (where it lives,
bytes per client) and the growth of host RSS and of live jax arrays over the case's start; a
``full`` row is the full-participation reference (K clients, every round). JSON, CSV, markdown:

    python -m benchmarks.bench --population   # N = 1e3, 1e4, 1e5, K = 50, device + host, fedbn
    python -m benchmarks.bench --population --population-sizes=10000 --cohorts=500 --repeats 4
    python -m benchmarks.bench --population --algorithms=fedavg,scaffold --population-sizes=1000
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import psutil

from benchmarks.bench import (
    ALGORITHMS,
    DEFAULT_OUT,
    SHAPES,
    device_peak_bytes,
    host_peak_mib,
    model_and_tx,
    paired_median_ratio,
    paired_timings,
    run_round,
    table,
    timed,
    yardstick,
)
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution import make_round

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch
COMPILED: list[str] = []  # names of the functions XLA compiled so far (see count_compiles)


def count_compiles(event: str, duration: float, **kw: Any) -> None:
    """A ``jax.monitoring`` listener: records each XLA compilation's function name."""
    if event == BACKEND_COMPILE_EVENT:
        COMPILED.append(str(kw.get("fun_name", "?")))


def population_clients(
    num: int, examples: int, shape: tuple[int, ...], seed: int = 0
) -> ClientArrays:
    """A population on the host (numpy): ``num`` clients of ``examples`` uint8 images each."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (num, examples, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, (num, examples), dtype=np.int32)
    return ClientArrays(x=x, y=y, n=np.full(num, examples, np.int32))


def host_rss_bytes() -> int:
    """The process's resident memory now."""
    return int(psutil.Process().memory_info().rss)


def live_device_bytes() -> int:
    """Bytes of every live jax array (on CPU these sit in host RAM, on GPU/TPU on the device)."""
    return sum(int(a.nbytes) for a in jax.live_arrays() if not a.is_deleted())


def split_nbytes(tree: Any) -> tuple[int, int]:
    """``(device, host)`` bytes of a tree's leaves: jax arrays, numpy arrays."""
    leaves = jax.tree.leaves(tree)
    device = sum(int(x.nbytes) for x in leaves if isinstance(x, jax.Array))
    return device, sum(int(x.nbytes) for x in leaves if isinstance(x, np.ndarray))


def bench_population_case(
    population: ClientArrays, cohort: int, placement: str, algorithm: str, args: argparse.Namespace
) -> dict:
    """One row: rounds of a ``cohort`` of ``population`` with client state on ``placement``
    (``full``: the reference, every one of ``cohort`` clients every round, no sampling),
    each paired with the yardstick, plus the memory the client state takes."""
    num, batch = int(population.n.shape[0]), args.batch_size
    model, tx = model_and_tx()
    alg = ALGORITHMS[algorithm](model, tx)
    if placement == "full":  # full participation of `cohort` clients, data on the device
        num = cohort
        train = jax.device_put(jax.tree.map(lambda a: a[:cohort], population))
        rnd = make_round(alg, executor=args.executor, batch_size=batch)
    else:
        train = population
        rnd = make_round(
            alg,
            executor=args.executor,
            batch_size=batch,
            cohort_size=cohort,
            state_placement=placement,
            donate_state=True,  # O(K) writes a round (the training-loop contract)
        )
    gc.collect()
    rss0, live0 = host_rss_bytes(), live_device_bytes()
    plain = yardstick(model, tx, jax.device_put(jax.tree.map(lambda a: a[:1], population)), batch)
    real_steps = cohort * -(-int(population.n[0]) // batch)  # every client has n[0] examples
    ystep = min(args.yard_steps or real_steps, real_steps)
    timed(lambda: plain(3))
    rounds = {"round": rnd}
    states = {"round": alg.init(jax.random.key(0), np.asarray(population.x[0, :1]), num)}
    first = timed(lambda: run_round(rounds, states, "round", train, 0))
    for r in range(args.warmup):
        timed(lambda r=r: run_round(rounds, states, "round", train, 1 + r))
    compiled = len(COMPILED)
    times, yards = paired_timings(
        plain, ystep, rounds, states, train, args.repeats or 8, start=1 + args.warmup
    )
    recompiled = COMPILED[compiled:]
    y = min(yards["round"])
    state_device, state_host = split_nbytes(states["round"].clients)
    state_bytes = state_device + state_host
    return dict(
        algorithm=algorithm,
        population=num,
        cohort=cohort,
        placement=placement,
        executor=rnd.executor,
        steps=real_steps,
        round_s=float(np.median(times["round"])),
        round_s_min=min(times["round"]),
        first_round_s=first,
        step_ms=y * 1e3,
        overhead=min(times["round"]) / (real_steps * y),
        overhead_median=paired_median_ratio(times["round"], yards["round"], real_steps),
        recompiles=len(recompiled),
        recompiled=sorted(set(recompiled)),
        state_bytes=state_bytes,
        state_mib=state_bytes / 2**20,
        state_device_mib=state_device / 2**20,
        state_host_mib=state_host / 2**20,
        bytes_per_client=state_bytes / num,
        data_bytes_per_client=(population.x[0].nbytes + population.y[0].nbytes),
        rss_growth_mib=(host_rss_bytes() - rss0) / 2**20,
        device_growth_mib=(live_device_bytes() - live0) / 2**20,
        host_rss_mib=host_rss_bytes() / 2**20,
        host_peak_mib=host_peak_mib(),
        device_peak_bytes=device_peak_bytes(),
        repeats=len(times["round"]),
    )


POPULATION_COLUMNS = (  # (header, row key, format)
    ("algorithm", "algorithm", "9"),
    ("N", "population", ">6"),
    ("K", "cohort", ">4"),
    ("state on", "placement", "8"),
    ("runs", "executor", "10.10"),
    ("steps", "steps", ">5"),
    ("s/round", "round_s", ">7.3f"),
    ("overhead", "overhead", ">8.3f"),
    ("(median)", "overhead_median", ">8.3f"),
    ("1st s", "first_round_s", ">6.1f"),
    ("recomp", "recompiles", ">6"),
    ("state MiB", "state_mib", ">9.1f"),
    ("on device", "state_device_mib", ">9.1f"),
    ("B/client", "bytes_per_client", ">8.0f"),
    ("RSS +MiB", "rss_growth_mib", ">8.1f"),
    ("dev +MiB", "device_growth_mib", ">8.1f"),
    ("RSS MiB", "host_rss_mib", ">7.0f"),
)


def population_main(args: argparse.Namespace) -> None:
    """The population benchmark (``--population``): rows, a table, JSON, CSV and markdown."""
    jax.monitoring.register_event_duration_secs_listener(count_compiles)
    sizes = [int(n) for n in args.population_sizes.split(",")]
    cohorts = [int(k) for k in args.cohorts.split(",")]
    placements = args.placements.split(",")
    algorithms = args.algorithms.split(",")
    rows: list[dict] = []
    start = time.perf_counter()

    def show(rows: list[dict]) -> None:  # the newest row as it comes, the header once
        lines = table(rows[-1:], POPULATION_COLUMNS).splitlines()
        print("\n".join(lines if len(rows) == 1 else lines[2:]), flush=True)

    if args.full_reference:  # full participation of K clients: the bound the cohorts keep
        population = population_clients(max(cohorts), args.client_examples, SHAPES["digits"])
        for alg in algorithms:
            for k in cohorts:
                rows.append(bench_population_case(population, k, "full", alg, args))
                show(rows)
    for num in sizes:
        population = population_clients(num, args.client_examples, SHAPES["digits"])
        for alg in algorithms:
            for k in (k for k in cohorts if k <= num):
                for placement in placements:
                    rows.append(bench_population_case(population, k, placement, alg, args))
                    show(rows)
        del population
    meta = dict(
        backend=jax.default_backend(),
        devices=[str(d) for d in jax.devices()],
        cpu_count=psutil.cpu_count(),
        jax=jax.__version__,
        data=f"{args.client_examples} uint8 8x8x1 images per client, population data on the "
        "host (numpy); only the cohort's rows move each round",
        yardstick="one plain jitted step: same model (train=True, mutable batch_stats), batch "
        "and optimizer, no masks; overhead = round time / (the cohort's real steps x its time)",
        memory="state MiB: the population's client-state arrays (on device: jax arrays); "
        "RSS +MiB / dev +MiB: growth of the process RSS / of live jax arrays over the case's "
        "start (population data already built), measured after the timed rounds",
        args=vars(args),
        seconds=time.perf_counter() - start,
    )
    out = Path(args.out if args.out != DEFAULT_OUT else "results/bench_population.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    with out.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "recompiled": " ".join(r["recompiled"])} for r in rows)
    md = table(rows, POPULATION_COLUMNS, markdown=True)
    out.with_suffix(".md").write_text(md + "\n")
    print(f"\n{md}\n\nbackend {meta['backend']}, {meta['seconds']:.0f} s; {out} (.csv, .md)")
