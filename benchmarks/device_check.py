"""A short, time-boxed check of the library on whatever device jax finds (a script, not a test).

Writes one JSON file with four sections:

- ``device``: backend, device kind(s), device count, jax / jaxlib versions;
- ``throughput``: seconds per round and examples/s of FedAvg rounds of SeedCNN (widths (32, 64),
  hidden 128) and ResNet18 on synthetic 32x32x3 uint8 data, 100 classes, for 10 and 100
  clients of 64 examples, with the ``vmap``, ``sequential`` and ``chunked`` executors: the first
  (compiling) round apart, then the median of a few timed rounds (``block_until_ready`` on the
  state, as ``benchmarks/bench.py`` times them). A combination that would not fit the time
  budget is recorded with ``skipped`` (the reason), one that fails with ``error``;
- ``seed_cifar100``: a few rounds of the CIFAR-100 setting (SeedCNN widths (64, 128, 256),
  hidden 256, 10 clients of Dirichlet-uneven sizes summing to ~5000, FedProx mu=1e-3 over
  Adam 5e-4 with coupled L2 1e-4, batch 32, ``augment.cifar_standard()``) on synthetic data of
  the real shapes: per-round seconds and losses (with a finiteness check).

- ``parallel_runs``: S seeds of the digits workload as one batched federation
  (``fb.vmap_runs``) against the same runs one by one, per-run round times and speedups
  (``benchmarks/parallel_runs.py``; S = 1, 2, 4, 8).

Order: the smallest cohort of SeedCNN, the CIFAR-100 setting, the smallest cohort of ResNet18,
the parallel runs, then the larger cohorts; a measurement starts only while the elapsed time
plus its estimate (from the entries of the same model already measured) stays within
``--budget``, so the budget cuts the costliest entries and every section keeps a measurement.

The JSON is rewritten after every entry (``"complete": false`` until the end), so a run cut
short by a hard timeout still leaves what it measured. ``--tiny`` (the default on a CPU backend
unless ``--full``) shrinks every size so the whole check takes well under two minutes on two
CPU cores. Progress goes to stderr.

    python benchmarks/device_check.py --out device_check.json [--tiny | --full] [--budget S]
    bash benchmarks/device_check.sh [OUT.json] [--tiny]     # what the GPU machine runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax

import fedjax_bn as fb
from benchmarks import parallel_runs
from fedjax_bn.data import ClientArrays, augment

# Seconds count from the wrapper's start where it passes one (DEVICE_CHECK_T0, epoch seconds), so
# the budget covers the imports too; else from this module's import.
START = time.perf_counter() - max(
    0.0, time.time() - float(os.environ.get("DEVICE_CHECK_T0") or time.time())
)
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 100
BATCH_SIZE = 32
EXECUTORS = ("vmap", "sequential", "chunked")

# Sizes per mode. ``budget_s``: seconds (from process start) after which no new measurement
# starts; the shell wrapper's hard timeout sits above it.
FULL = dict(
    seed_cnn=dict(widths=(32, 64), hidden=128),
    resnet18=dict(num_filters=64),
    clients=(10, 100),
    examples_per_client=64,
    timed_rounds=3,
    seed_cifar100=dict(widths=(64, 128, 256), hidden=256, clients=10, examples=5000, rounds=3),
    parallel_runs=dict(runs=(1, 2, 4, 8), rounds=3, executors=("sequential", "vmap"), work={}),
    budget_s=380.0,  # the wrapper's hard timeout: 450 s
)
TINY = dict(
    seed_cnn=dict(widths=(8,), hidden=16),
    resnet18=dict(num_filters=4),
    clients=(4, 8),
    examples_per_client=8,
    timed_rounds=2,
    seed_cifar100=dict(widths=(8,), hidden=16, clients=4, examples=64, rounds=2),
    parallel_runs=dict(
        runs=(1, 2), rounds=1, executors=("vmap",), work=dict(clients=4, widths=(8,), hidden=16)
    ),
    # On 2 CPU cores ResNet18's first entry (~20 s of compile) uses up the budget: the rest of
    # ResNet18 and the 8-client cohort are skipped, and the check takes about a minute.
    budget_s=55.0,
)


def log(msg: str) -> None:
    print(f"[device_check {elapsed():6.1f}s] {msg}", file=sys.stderr, flush=True)


def elapsed() -> float:
    return time.perf_counter() - START


def device_info() -> dict[str, Any]:
    devices = jax.devices()
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:  # noqa: BLE001 - informational only
        jaxlib_version = None
    return dict(
        backend=jax.default_backend(),
        device_kind=devices[0].device_kind,
        device_kinds=sorted({d.device_kind for d in devices}),
        device_count=len(devices),
        local_device_count=jax.local_device_count(),
        platform=devices[0].platform,
        jax_version=jax.__version__,
        jaxlib_version=jaxlib_version,
        python=platform.python_version(),
        host_cpu_count=os.cpu_count(),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        compilation_cache=jax.config.jax_compilation_cache_dir,
    )


def synthetic(sizes: list[int], seed: int) -> ClientArrays:
    """uint8 32x32x3 images and labels in [0, 100), zero-padded past each client's size,
    placed on the default device once (the rounds then move no data from the host)."""
    rng = np.random.default_rng(seed)
    c, n_max = len(sizes), max(sizes)
    x = rng.integers(0, 256, (c, n_max, *IMAGE_SHAPE), dtype=np.uint8)
    y = rng.integers(0, NUM_CLASSES, (c, n_max), dtype=np.int32)
    valid = np.arange(n_max)[None, :] < np.asarray(sizes)[:, None]
    x = np.where(valid[..., None, None, None], x, 0).astype(np.uint8)
    y = np.where(valid, y, 0).astype(np.int32)
    train = ClientArrays(x=x, y=y, n=np.asarray(sizes, np.int32))
    return jax.device_put(train)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` until its outputs are ready, and the outputs."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - start, out


def losses_of(result: Any, sizes: list[int]) -> dict[str, Any]:
    loss = np.asarray(result.loss, np.float64)
    n = np.asarray(sizes, np.float64)
    real = n > 0
    return dict(
        loss_mean=float(np.sum(loss[real] * n[real]) / np.sum(n[real])),
        loss_per_client=[float(v) for v in loss],
        finite=bool(np.all(np.isfinite(loss[real]))),
    )


def chunk_size_for(clients: int) -> int:
    """10 clients a chunk for a cohort of 100+; two chunks for a smaller one."""
    return 10 if clients >= 100 else max(1, clients // 2)


def estimate_s(done: list[dict], model: str, executor: str, clients: int, rounds: int) -> float:
    """Seconds the next combination will probably take, from the measured ones of the same
    model (and executor where there is one): compile + (1 + rounds) rounds, rounds scaled by
    the client count. 0 when nothing comparable was measured yet."""
    prior = [e for e in done if e.get("model") == model and "round_s" in e]
    same = [e for e in prior if e["executor"] == executor] or prior
    if not same:
        return 0.0
    return max(e["compile_s"] + (1 + rounds) * e["round_s"] * clients / e["clients"] for e in same)


def throughput_entry(
    name: str,
    model: Any,
    model_config: dict,
    clients: int,
    executor: str,
    train: ClientArrays,
    cfg: dict,
    budget_s: float,
) -> dict:
    """One measured (model, clients, executor) combination."""
    n = cfg["examples_per_client"]
    chunk = chunk_size_for(clients) if executor == "chunked" else None
    entry: dict[str, Any] = dict(
        model=name,
        model_config=model_config,
        clients=clients,
        examples_per_client=n,
        image_shape=list(IMAGE_SHAPE),
        num_classes=NUM_CLASSES,
        executor=executor,
        chunk_size=chunk,
        batch_size=BATCH_SIZE,
        local_epochs=1,
        steps_per_client=-(-n // BATCH_SIZE),
        algorithm="fedavg",
        optimizer="adam(5e-4)",
        augment=None,
    )
    tx = optax.adam(5e-4)
    alg = fb.fedavg(model, tx)
    opts = {"chunk_size": chunk} if chunk else {}
    round_fn = fb.make_round(alg, executor=executor, batch_size=BATCH_SIZE, **opts)
    state = alg.init(jax.random.key(0), train.x[0, :1], clients)
    entry["runs"] = getattr(round_fn, "executor", executor)
    first, (state, result) = timed(lambda: round_fn(state, train, jax.random.key(0)))
    entry["first_round_s"] = first
    times: list[float] = []
    for r in range(cfg["timed_rounds"]):
        if times and elapsed() + times[-1] > budget_s:
            entry["note"] = f"stopped after {len(times)} timed round(s): time budget"
            break
        t, (state, result) = timed(
            lambda state=state, r=r: round_fn(state, train, jax.random.key(1 + r))
        )
        times.append(t)
    round_s = statistics.median(times)
    examples = clients * n
    entry.update(
        round_s=round_s,
        round_s_all=times,
        timed_rounds=len(times),
        compile_s=max(first - round_s, 0.0),
        examples_per_round=examples,
        examples_per_s=examples / round_s,
        **losses_of(result, [n] * clients),
    )
    return entry


def seed_cifar100(cfg: dict, budget_s: float, report: dict, save: Callable[[], None]) -> dict:
    """The CIFAR-100 setting on synthetic data of the real shapes, written into
    ``report["seed_cifar100"]`` and saved after every round."""
    sc = cfg["seed_cifar100"]
    clients, total = sc["clients"], sc["examples"]
    rng = np.random.default_rng(100)
    share = rng.dirichlet(np.full(clients, 0.5))
    sizes = np.maximum(np.round(share * total).astype(int), BATCH_SIZE // 4).tolist()
    model_config = dict(widths=sc["widths"], hidden=sc["hidden"], num_classes=NUM_CLASSES)
    model = fb.SeedCNN(**model_config)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(5e-4))
    alg = fb.fedprox(model, tx, 1e-3, augment=augment.cifar_standard())
    round_fn = fb.make_round(alg, batch_size=BATCH_SIZE, local_epochs=1)
    train = synthetic(sizes, seed=7)
    state = alg.init(jax.random.key(0), train.x[0, :1], clients)
    out: dict[str, Any] = dict(
        config=dict(
            model="SeedCNN",
            model_config=model_config,
            clients=clients,
            client_sizes=sizes,
            examples=int(sum(sizes)),
            dirichlet_alpha=0.5,
            image_shape=list(IMAGE_SHAPE),
            num_classes=NUM_CLASSES,
            algorithm="fedprox",
            mu=1e-3,
            optimizer="chain(add_decayed_weights(1e-4), adam(5e-4))",
            batch_size=BATCH_SIZE,
            local_epochs=1,
            augment="cifar_standard",
            executor="auto",
        ),
        runs=getattr(round_fn, "executor", "auto"),
        rounds=[],
    )
    report["seed_cifar100"] = out
    for r in range(sc["rounds"] + 1):  # round 0 compiles; round 1 is the first timed one
        if r > 1 and elapsed() + out["rounds"][-1]["seconds"] > budget_s:
            out["note"] = f"stopped after {r} round(s): time budget"
            break
        t, (state, result) = timed(
            lambda state=state, r=r: round_fn(state, train, jax.random.key(r))
        )
        out["rounds"].append(dict(round=r, seconds=t, compiles=r == 0, **losses_of(result, sizes)))
        log(f"seed_cifar100 round {r}: {t:.2f} s, loss {out['rounds'][-1]['loss_mean']:.4f}")
        save()
    timed_s = [e["seconds"] for e in out["rounds"][1:]]
    out["runs"] = getattr(round_fn, "executor", out["runs"])
    out.update(
        first_round_s=out["rounds"][0]["seconds"],
        round_s=statistics.median(timed_s) if timed_s else None,
        examples_per_s=sum(sizes) / statistics.median(timed_s) if timed_s else None,
        all_finite=all(e["finite"] for e in out["rounds"]),
    )
    return out


def parallel_runs_entry(pc: dict, budget_s: float) -> dict:
    """S digits runs batched (``fb.vmap_runs``) against the runs one by one
    (``benchmarks/parallel_runs.py``), timed rounds stopped at the budget; skipped past it."""
    if elapsed() > budget_s:
        return dict(skipped=f"time budget: {elapsed():.0f} s elapsed")
    log("parallel_runs ...")
    try:
        out = parallel_runs.measure(
            list(pc["runs"]),
            pc["rounds"],
            list(pc["executors"]),
            work=pc["work"],
            deadline=START + budget_s,
        )
    except Exception as e:  # noqa: BLE001 - record and go on
        log(f"parallel_runs failed: {type(e).__name__}: {e}"[:500])
        return dict(error=f"{type(e).__name__}: {e}"[:2000])
    log("parallel_runs:\n" + parallel_runs.table(out))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="device_check.json", help="the JSON file to write")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--tiny", action="store_true", help="tiny sizes (default on CPU)")
    mode.add_argument("--full", action="store_true", help="full sizes even on CPU")
    parser.add_argument(
        "--budget", type=float, default=None, help="seconds after which nothing new starts"
    )
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    tiny = args.tiny or (backend == "cpu" and not args.full)
    cfg = TINY if tiny else FULL
    budget_s = args.budget if args.budget is not None else cfg["budget_s"]
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    report: dict[str, Any] = dict(
        device=device_info(),
        mode="tiny" if tiny else "full",
        budget_s=budget_s,
        complete=False,
        throughput=[],
        seed_cifar100=None,
        parallel_runs=None,
    )

    def save() -> None:
        report["elapsed_s"] = elapsed()
        tmp = out_path.with_suffix(out_path.suffix + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        tmp.replace(out_path)

    dev = report["device"]
    log(f"{dev['backend']} x{dev['device_count']} ({dev['device_kind']}), jax {dev['jax_version']}")
    log(f"mode {report['mode']}, budget {budget_s:.0f} s, out {out_path}")
    save()

    models = [
        ("SeedCNN", fb.SeedCNN, dict(num_classes=NUM_CLASSES, **cfg["seed_cnn"])),
        ("ResNet18", fb.ResNet18, dict(num_classes=NUM_CLASSES, **cfg["resnet18"])),
    ]
    # The smallest cohort of each model first (SeedCNN, the CIFAR-100 setting, ResNet18), then
    # the larger cohorts: when the budget runs out, it cuts the large (ResNet18) cohorts and
    # every model and section still has a measurement.
    order: list[tuple[str, Any, int | None]] = []
    for i, clients in enumerate(cfg["clients"]):
        order.append(("throughput", models[0], clients))
        if i == 0:
            order.append(("seed_cifar100", None, None))
        order += [("throughput", spec, clients) for spec in models[1:]]
        if i == 0:
            order.append(("parallel_runs", None, None))
    rounds = cfg["timed_rounds"]
    data: dict[int, ClientArrays] = {}
    for section, spec, clients in order:
        if section == "parallel_runs":
            report["parallel_runs"] = parallel_runs_entry(cfg["parallel_runs"], budget_s)
            save()
            continue
        if section == "seed_cifar100":
            if elapsed() > budget_s:
                report["seed_cifar100"] = dict(skipped=f"time budget: {elapsed():.0f} s elapsed")
            else:
                log("seed_cifar100 ...")
                try:
                    seed_cifar100(cfg, budget_s, report, save)
                except Exception as e:  # noqa: BLE001 - record and go on
                    partial = report["seed_cifar100"] or {}  # the rounds it did finish
                    report["seed_cifar100"] = dict(partial, error=f"{type(e).__name__}: {e}"[:2000])
                    log(f"seed_cifar100 failed: {type(e).__name__}: {e}"[:500])
            save()
            continue
        name, ctor, model_config = spec
        model = ctor(**model_config)
        for executor in EXECUTORS:
            done = report["throughput"]
            est = estimate_s(done, name, executor, clients, rounds)
            base = dict(model=name, model_config=model_config, clients=clients)
            base.update(executor=executor, examples_per_client=cfg["examples_per_client"])
            if executor == "chunked":
                base["chunk_size"] = chunk_size_for(clients)
            if elapsed() + est > budget_s:
                reason = (
                    f"time budget: {elapsed():.0f} s elapsed, ~{est:.0f} s estimated, "
                    f"budget {budget_s:.0f} s"
                )
                done.append(dict(base, skipped=reason))
                log(f"{name} C={clients} {executor}: skipped ({reason})")
                save()
                continue
            log(f"{name} C={clients} {executor} ...")
            try:
                if clients not in data:
                    data[clients] = synthetic([cfg["examples_per_client"]] * clients, clients)
                entry = throughput_entry(
                    name, model, model_config, clients, executor, data[clients], cfg, budget_s
                )
                log(
                    f"{name} C={clients} {executor}: {entry['round_s']:.3f} s/round, "
                    f"{entry['examples_per_s']:.0f} ex/s, compile {entry['compile_s']:.1f} s"
                )
            except Exception as e:  # noqa: BLE001 - e.g. out of device memory: go on
                entry = dict(base, error=f"{type(e).__name__}: {e}"[:2000])
                log(f"{name} C={clients} {executor} failed: {type(e).__name__}: {e}"[:500])
            done.append(entry)
            save()
            gc.collect()  # the entry's state and round function: free their device memory
    data.clear()
    # Listed model by model, cohort by cohort (they ran in priority order: see ``run_order``).
    rank = {name: i for i, (name, _, _) in enumerate(models)}
    for i, e in enumerate(report["throughput"]):
        e["run_order"] = i
    report["throughput"].sort(
        key=lambda e: (rank[e["model"]], e["clients"], EXECUTORS.index(e["executor"]))
    )

    report["complete"] = True
    save()
    log(f"done in {elapsed():.1f} s: {out_path}")
    return report


if __name__ == "__main__":
    main()
