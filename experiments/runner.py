"""The experiment runner: for every (setting, seed, algorithm) train, evaluate, monitor, record.

All federated logic is the library's (``fedjax_bn``); this module wires a config to it and writes
results. :func:`run_experiment` is the in-process entry point; ``experiments/run.py`` the CLI.
"""

from __future__ import annotations

import datetime
import functools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

import fedjax_bn as fb
from experiments import registry, report
from experiments.configs import base
from fedjax_bn import monitor
from fedjax_bn.data import FederatedData

Config = ml_collections.ConfigDict
ConfigError = registry.ConfigError


class Seeds(NamedTuple):
    """Independent seeds derived from one experiment seed."""

    init: int
    data: int
    shuffle: int


def derive_seeds(seed: int) -> Seeds:
    """Model init, data partition and client shuffling seeds, independent of each other."""
    init, data, shuffle = np.random.SeedSequence(seed).generate_state(3)
    return Seeds(int(init), int(data) % 2**31, int(shuffle))


def flat_fields(config: Config, prefix: str = "") -> dict[str, Any]:
    """Every leaf field of a config by dotted path (``data.alpha``), in config order."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        out.update(flat_fields(value, path + ".") if isinstance(value, Config) else {path: value})
    return out


def field_paths(config: Config) -> list[str]:
    """Every leaf field of a config as a dotted path, sorted."""
    return sorted(flat_fields(config))


def check_fields(config: Config) -> None:
    """Raise a ConfigError naming unknown fields and listing the valid ones (base.get_config)."""
    valid = field_paths(base.get_config())
    unknown = sorted(set(field_paths(config)) - set(valid))
    if unknown:
        raise ConfigError(f"Unknown config field(s) {unknown}; valid fields: {', '.join(valid)}.")


def validate(config: Config) -> Config:
    """Check every name and number before any training; returns a copy with names normalized."""
    check_fields(config)
    config = Config(config.to_dict())  # unlocked copy; the caller's config is left alone
    config.settings = registry.names(config.settings)
    config.algorithms = registry.names(config.algorithms)
    for name in config.settings:
        registry.lookup(registry.SETTINGS, name, "setting")
    for name in config.algorithms:
        registry.lookup(registry.ALGORITHMS, name, "algorithm")
    if not config.settings or not config.algorithms:
        raise ConfigError("Give at least one setting and one algorithm.")
    seeds = config.seeds if isinstance(config.seeds, list | tuple) else [config.seeds]
    config.seeds = tuple(int(s) for s in registry.names([str(s) for s in seeds]))
    if not config.seeds:
        raise ConfigError("Give at least one seed, e.g. --config.seeds=0,1,2.")
    for key in ("rounds", "eval_every", "batch_size", "local_epochs"):
        if int(config[key]) < 1:
            raise ConfigError(f"config.{key} must be >= 1, got {config[key]}.")
    if float(config.server_lr) < 0:
        raise ConfigError(f"config.server_lr must be >= 0 (0: default), got {config.server_lr}.")
    model = registry.build_model(config, num_classes=10)
    tx = registry.build_optimizer(config)
    try:  # factories check their hyperparameters; make_round knows the executors
        algs = [registry.build_algorithm(a, model, tx, config) for a in config.algorithms]
        fb.make_round(algs[0], executor=config.executor, batch_size=config.batch_size)
    except ConfigError:
        raise
    except ValueError as e:  # e.g. mu < 0, an unknown executor (listing the valid ones)
        raise ConfigError(str(e)) from e
    return config


def enable_compilation_cache(path: str) -> None:
    """jax's persistent compilation cache in ``path`` for this process; '' turns it off."""
    if path:
        fb.enable_compilation_cache(path)
    else:
        fb.disable_compilation_cache()


def prepare_out_dir(config: Config) -> Path:
    """Create the output directory and prove it writable, or raise a clear ConfigError."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(config.out_dir or f"results/{config.name}-{stamp}").expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"Cannot write to output directory {out}: {e.strerror or e}. "
            "Choose another with --config.out_dir=PATH."
        ) from e
    return out


def _mean_by(values: Any, weights: Any) -> float:
    values, weights = np.asarray(values, np.float64), np.asarray(weights, np.float64)
    return float(np.sum(values * weights) / max(np.sum(weights), 1.0))


def _floats(per_layer: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in per_layer.items()}


def train_run(
    config: Config, data: FederatedData, setting: str, alg_name: str, seed: int, out: Path
) -> list[report.Row]:
    """Train one algorithm on one setting with one seed; every round is written and flushed."""
    seeds = derive_seeds(seed)
    model = registry.build_model(config, data.num_classes)
    alg = registry.build_algorithm(alg_name, model, registry.build_optimizer(config), config)
    round_fn = fb.make_round(
        alg,
        executor=config.executor,
        batch_size=config.batch_size,
        local_epochs=config.local_epochs,
    )
    measure = jax.jit(functools.partial(monitor.round_divergences, alg))
    x_probe, mask_probe = monitor.probe_batches(data.train, config.monitor.probe_size)
    state = alg.init(jax.random.key(seeds.init), data.train.x[0, :1], data.num_clients)
    key = jax.random.key(seeds.shuffle)
    writer = report.HistoryWriter(report.history_path(out, setting, alg_name, seed))
    rows: list[report.Row] = []
    start = time.perf_counter()
    bar = tqdm(
        range(1, config.rounds + 1),
        desc=f"{setting} {alg_name} seed={seed}",
        unit="round",
        disable=not config.progress,
        file=sys.stderr,
    )
    acc = None
    try:
        for rnd in bar:
            key, round_key = jax.random.split(key)
            t0 = time.perf_counter()
            state, result = round_fn(state, data.train, round_key)
            jax.block_until_ready(state)
            seconds = time.perf_counter() - t0
            # The clients' post-round statistics, when the round returns them (see monitor.py).
            client_stats = getattr(result, "batch_stats", None)
            div = measure(state, x_probe, mask_probe, client_stats)
            row: report.Row = {
                "setting": setting,
                "algorithm": alg_name,
                "seed": seed,
                "round": rnd,
                "train_loss": _mean_by(result.loss, result.num_seen),
                "train_acc": _mean_by(result.accuracy, result.num_seen),
                "global_acc": None,
                "global_loss": None,
                "client_acc": None,
                "bn_div": float(monitor.mean_over_layers(div["bn"])),
                "bn_div_source": monitor.stats_source(state, client_stats),
                "probe_div": float(monitor.mean_over_layers(div["probe"])),
                "affine_div": float(monitor.mean_over_layers(div["affine"])),
                "bn_div_layers": _floats(div["bn"]),
                "probe_div_layers": _floats(div["probe"]),
                "affine_div_layers": _floats(div["affine"]),
                "seconds": seconds,
            }
            if rnd == 1 or rnd % config.eval_every == 0 or rnd == config.rounds:
                glob = fb.evaluate_global(alg, state, data, config.eval_batch_size)
                clients = fb.evaluate_clients(alg, state, data, config.eval_batch_size)
                if glob is not None:
                    row.update(global_acc=glob.accuracy, global_loss=glob.loss)
                row["client_acc"] = acc = clients.mean_accuracy
            row["wall"] = time.perf_counter() - start
            writer.write(row)
            rows.append(row)
            bar.set_postfix(
                loss=f"{row['train_loss']:.3f}", acc="-" if acc is None else f"{acc:.3f}"
            )
    finally:
        bar.close()
        writer.close()
    return rows


def finish(out: Path, config: Config, runs: list[report.Row], rows: list[report.Row]) -> dict:
    """Summary JSON, tables on stdout, plots; returns the summary."""
    results = report.aggregate(runs)
    summary = {"name": config.name, "runs": runs, "results": results}
    report.write_json(out / "summary.json", summary)
    by_setting: dict[str, dict[str, list[report.Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_setting[row["setting"]][row["algorithm"]].append(row)
    plots = []
    for setting, per_alg in results.items():
        print("\n" + report.format_table(setting, per_alg))
        plots += report.plot_setting(out, setting, by_setting[setting])
    print(f"\nPlots: {', '.join(str(p.relative_to(out)) for p in plots)}")
    print(f"Results in {out}")
    return summary


def run_experiment(config: Config) -> Path:
    """Run every (setting, seed, algorithm) of ``config``; returns the output directory.

    Writes ``config.json`` (resolved), ``history/*.jsonl`` (one row per round, flushed),
    ``summary.json`` and ``plots/*.png``; prints a table per setting. On Ctrl-C the history so
    far is kept and its location printed, then KeyboardInterrupt propagates.
    """
    config = validate(config)
    out = prepare_out_dir(config)
    config.out_dir = str(out)
    enable_compilation_cache(config.compilation_cache)
    (out / "config.json").write_text(config.to_json(indent=2) + "\n")
    print(f"Output directory: {out}")
    runs: list[report.Row] = []
    rows: list[report.Row] = []
    t0 = time.perf_counter()
    try:
        for setting in config.settings:
            for seed in config.seeds:
                data = registry.build_setting(setting, config, derive_seeds(seed).data)
                for alg_name in config.algorithms:
                    run_rows = train_run(config, data, setting, alg_name, seed, out)
                    rows += run_rows
                    runs.append(report.run_summary(run_rows))
    except KeyboardInterrupt:
        print(
            f"\nInterrupted after {len(runs)} complete run(s); the per-round history so far "
            f"is in {out / 'history'}",
            file=sys.stderr,
        )
        raise
    finish(out, config, runs, rows)
    print(f"Total wall time: {time.perf_counter() - t0:.1f} s")
    return out
