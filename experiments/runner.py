"""The experiment runner: for every (setting, seed, algorithm) train, evaluate, monitor, record.

All federated logic is the library's (``fedjax_bn``); this module wires a config to it and writes
results. :func:`run_experiment` is the in-process entry point; ``experiments/run.py`` the CLI.
"""

from __future__ import annotations

import contextlib
import datetime
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import ml_collections

import fedjax_bn as fb
from experiments import checks, parallel, plots, registry, report, sweep, sweep_report, train
from experiments.train import Seeds, derive_seeds, train_run  # noqa: F401  (re-exported)

Config = ml_collections.ConfigDict
ConfigError = registry.ConfigError


def enable_compilation_cache(path: str) -> None:
    """jax's persistent compilation cache in ``path`` for this process; '' turns it off (so
    does ``FEDJAX_BN_COMPILATION_CACHE=0``)."""
    if path:
        fb.enable_compilation_cache(path)
    else:
        fb.disable_compilation_cache()


RESULT_ENTRIES = ("config.json", "history", "checkpoints", "summary.json", "plots", "tensorboard")


def prepare_out_dir(config: Config, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Create the output directory and prove it writable, or raise a clear ConfigError.

    A directory that already holds results is refused unless ``resume`` (continue it) or
    ``overwrite`` (its previous results are deleted first).
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(config.out_dir or f"results/{config.name}-{stamp}").expanduser().resolve()
    found = [name for name in RESULT_ENTRIES if (out / name).exists()]
    if found and not (resume or overwrite):
        raise ConfigError(
            f"Output directory {out} already holds results ({', '.join(found)}); continue it "
            f"with --resume={out}, replace them with --overwrite, or choose another "
            "--config.out_dir."
        )
    if resume and not (out / "config.json").exists():
        raise ConfigError(f"Nothing to resume in {out}: it has no config.json.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"Cannot write to output directory {out}: {e.strerror or e}. "
            "Choose another with --config.out_dir=PATH."
        ) from e
    if overwrite and not resume:
        for name in found:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink()
    return out


def finish(out: Path, config: Config, runs: list[report.Row], rows: list[report.Row]) -> dict:
    """Summary JSON, tables on stdout, plots; returns the summary."""
    results = report.aggregate(runs)
    summary = {"name": config.name, "runs": runs, "results": results}
    report.write_json(out / "summary.json", summary)
    by_setting: dict[str, dict[str, list[report.Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_setting[row["setting"]][row["algorithm"]].append(row)
    figures = []
    for setting, per_alg in results.items():
        print("\n" + report.format_table(setting, per_alg))
        figures += plots.plot_setting(out, setting, by_setting[setting])
    for table in report.format_grids(results):  # a sweep: one table over its points
        print("\n" + table)
    figures += sweep_report.write_sweeps(out, results)  # and a CSV and a plot over them
    print(f"\nPlots and grids: {', '.join(str(p.relative_to(out)) for p in figures)}")
    print(f"Results in {out}")
    return summary


def run_experiment(config: Config, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Run every (setting, seed, algorithm) of ``config``; returns the output directory.

    Every config and data check runs before anything is written. Writes ``config.json``
    (resolved), ``history/*.jsonl`` (one row per round, flushed), ``checkpoints/``,
    ``summary.json`` and ``plots/*.png``; prints a table per setting. ``resume`` continues the
    runs in ``config.out_dir`` (complete runs are read back, the interrupted one restored from
    its latest checkpoint). On Ctrl-C (or SIGTERM) the current run is checkpointed, the partial
    results are summarized, then KeyboardInterrupt propagates.
    """
    config = checks.validate(config)
    grid = sweep.points(config)  # [{}] without a sweep
    runs_to_train = {}  # every run built (and so checked) before anything is written
    for setting in config.settings:
        for seed in config.seeds:
            data = registry.build_setting(setting, config, derive_seeds(seed).data)
            for alg_name in config.algorithms:
                built = train.build_run(config, data, alg_name, seed)  # once for the grid
                sweep.check_run(alg_name, built, grid[0])
                for point in grid:
                    key = (sweep.label(setting, point), seed, alg_name)
                    runs_to_train[key] = sweep.at_point(config, built, point)
    out = prepare_out_dir(config, resume=resume, overwrite=overwrite)
    config.out_dir = str(out)
    enable_compilation_cache(config.compilation_cache)
    if not resume:
        (out / "config.json").write_text(config.to_json(indent=2) + "\n")
    print(f"Output directory: {out}")
    t0 = time.perf_counter()
    done: dict[tuple[str, int, str], list[report.Row]] = {}  # each run's rows
    try:
        for batch in parallel.training_order(config, runs_to_train):
            trained = parallel.train_batch(config, runs_to_train, batch, out, resume)
            done.update(zip(batch, trained, strict=True))
    except KeyboardInterrupt:
        print(
            f"\nInterrupted after {len(done)} complete run(s); the history so far is in "
            f"{out / 'history'}; continue with: python -m experiments.run --resume={out}",
            file=sys.stderr,
        )
        with contextlib.suppress(FileNotFoundError):  # no round finished yet
            report.rebuild([out], out)
        raise
    runs = [report.run_summary(done[key]) for key in runs_to_train]  # in the config's order
    rows = [row for key in runs_to_train for row in done[key]]
    finish(out, config, runs, rows)
    print(f"Total wall time: {time.perf_counter() - t0:.1f} s")
    return out
