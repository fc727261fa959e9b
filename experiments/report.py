"""What a run leaves behind, read back: per-round history (JSON lines), run summaries, statistics
over seeds and the tables printed per setting. Plots are ``experiments/plots.py``; writing rows
while a run trains is ``experiments/writers.py``.

``python -m experiments.report DIR [DIR ...] [--out OUT]`` rebuilds summary, tables and plots
from the histories alone."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import plots, sweep_report
from experiments.history import (  # noqa: F401  (re-exported: report.read_history, ...)
    BN_SOURCES,
    BUILTIN_COLUMNS,
    FINAL_METRICS,
    WIRE_COLUMNS,
    Row,
    clean,
    dp_columns,
    history_path,
    last_value,
    metric_columns,
    read_history,
    run_summary,
    source_notes,
    source_tag,
    split_label,
    write_json,
)
from experiments.writers import HistoryWriter  # noqa: F401  (re-exported)


def mean_std(values: Iterable[float | None]) -> dict[str, Any]:
    """{mean, std, values} over the non-null values (mean/std None when there are none)."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "values": []}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "values": vals}


def aggregate(runs: Sequence[Row]) -> dict[str, dict[str, dict[str, Any]]]:
    """{setting: {algorithm: {metric: {mean, std, values}}}} over seeds, in run order."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for run in runs:
        groups[(run["setting"], run["algorithm"])].append(run)
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (setting, alg), group in groups.items():
        metrics = (*FINAL_METRICS, *metric_columns(group), *dp_columns(group), "sec_per_round")
        metrics += tuple(k for k in WIRE_COLUMNS if k in group[0])
        out[setting][alg] = {m: mean_std(r.get(m) for r in group) for m in metrics}
        out[setting][alg]["seeds"] = [r["seed"] for r in group]
        out[setting][alg]["bn_div_source"] = group[-1]["bn_div_source"]
    return dict(out)


def _cell(stat: dict[str, Any], fmt: str) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = format(stat["mean"], fmt)
    return text + (f" ± {format(stat['std'], fmt)}" if len(stat["values"]) > 1 else "")


TABLE_COLUMNS = (
    ("global acc", "global_acc", ".3f"),
    ("client acc", "client_acc", ".3f"),
    ("final loss", "train_loss", ".3f"),
    ("BN div [stats]", "bn_div", ".3g"),
    ("s/round", "sec_per_round", ".3f"),
)


def _columns(per_alg: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """:data:`TABLE_COLUMNS`, then one per task-metric column any algorithm has."""
    extra = metric_columns(per_alg.values())
    dp = [("epsilon", "epsilon", ".3g")] if "epsilon" in dp_columns(per_alg.values()) else []
    return [*TABLE_COLUMNS, *((k.replace("_", " ", 1), k, ".3g") for k in extra), *dp]


def _row_cells(stats: dict[str, Any], columns: Sequence[tuple[str, str, str]]) -> list[str]:
    """One table row's cells; the BN divergence names the statistics it comes from."""
    cells = []
    for _, key, fmt in columns:
        cell = _cell(stats.get(key, mean_std(())), fmt)
        tag = source_tag(stats.get("bn_div_source")) if key == "bn_div" else ""
        cells.append(f"{cell} {tag}" if tag and cell != "n/a" else cell)
    return cells


def format_table(setting: str, per_alg: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of one setting's final metrics (mean ± std over seeds)."""
    columns = _columns(per_alg)
    header = ["algorithm", *(c[0] for c in columns)]
    body = [[alg, *_row_cells(stats, columns)] for alg, stats in per_alg.items()]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]]
    seeds = max(len(s["seeds"]) for s in per_alg.values())
    title = f"{setting} ({seeds} seed{'s' if seeds > 1 else ''}"
    title += ", mean ± std)" if seeds > 1 else ")"
    notes = source_notes(s.get("bn_div_source") for s in per_alg.values())
    notes = [f"  BN div {n}" for n in notes]
    return "\n".join([title, "-" * len(lines[0]), *lines, *notes])


def _accuracy(stats: dict[str, Any]) -> str:
    """The final global accuracy, else (no global model) the mean client accuracy, marked."""
    glob = stats.get("global_acc", mean_std(()))
    if glob["mean"] is not None:
        return _cell(glob, ".3f")
    client = _cell(stats.get("client_acc", mean_std(())), ".3f")
    return client if client == "n/a" else f"{client} (c)"


def format_grids(results: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """One table per swept setting (labels ``<setting>@<point>``, ``experiments/sweep.py``):
    a row per grid point, a column per algorithm, the final accuracy."""
    grids: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for label, per_alg in results.items():
        setting, point = split_label(label)
        if point:
            grids[setting][point] = per_alg
    tables = []
    for setting, by_point in grids.items():
        algs = list(dict.fromkeys(a for per_alg in by_point.values() for a in per_alg))
        body = [
            [point, *(_accuracy(per_alg[a]) if a in per_alg else "n/a" for a in algs)]
            for point, per_alg in by_point.items()
        ]
        rows = [["grid point", *algs], *body]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
        title = f"{setting} sweep: final global accuracy ((c): mean client accuracy)"
        tables.append("\n".join([title, "-" * len(lines[0]), *lines]))
    return tables


def config_order(config: dict[str, Any]) -> Any:
    """A sort key for a run's first row: the runner's order (settings, then seeds, then
    algorithms, as ``config`` lists them); runs it does not list come after, by name."""

    def rank(names: list[Any], name: Any) -> tuple[int, str]:
        return (names.index(name), "") if name in names else (len(names), str(name))

    def key(row: Row) -> tuple:
        return (
            rank(config.get("settings", []), split_label(row["setting"])[0]),
            rank(config.get("seeds", []), row["seed"]),
            rank(config.get("algorithms", []), row["algorithm"]),
        )

    return key


def collect(dirs: Sequence[Path]) -> tuple[list[Row], list[Row]]:
    """(run summaries, all rows) from every ``history/*.jsonl`` under ``dirs``, in the order
    the runner trained them (``config_order``); a run is ``complete`` when it reached its
    directory's ``config.json`` rounds."""
    runs, rows = [], []
    for d in dirs:
        config_path = d / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        want = config.get("rounds")
        order = config_order(config)
        histories = [read_history(p) for p in sorted((d / "history").glob("*.jsonl"))]
        for run_rows in sorted((h for h in histories if h), key=lambda h: order(h[0])):
            summary = run_summary(run_rows)
            summary["complete"] = want is not None and run_rows[-1]["round"] >= want
            runs.append(summary)
            rows += run_rows
    return runs, rows


def rebuild(dirs: Sequence[Path], out: Path) -> dict[str, Any]:
    """``summary.json``, tables (stdout) and plots in ``out`` from the histories in ``dirs``."""
    runs, rows = collect(dirs)
    if not runs:
        raise FileNotFoundError(f"no history/*.jsonl under {', '.join(map(str, dirs))}")
    results = aggregate(runs)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"sources": [str(d) for d in dirs], "runs": runs, "results": results}
    write_json(out / "summary.json", summary)
    by_setting: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_setting[row["setting"]][row["algorithm"]].append(row)
    for setting, per_alg in results.items():
        print("\n" + format_table(setting, per_alg))
        plots.plot_setting(out, setting, by_setting[setting])
    for table in format_grids(results):
        print("\n" + table)
    sweep_report.write_sweeps(out, results)
    for run in runs:
        state = "complete" if run["complete"] else "INCOMPLETE"
        name = f"{run['setting']} {run['algorithm']} seed={run['seed']}"
        print(f"{name}: {run['rounds']} rounds, {state}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.report DIR [DIR ...] [--out OUT]``: rebuild from history."""
    import argparse

    parser = argparse.ArgumentParser(description=rebuild.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="run output directories")
    parser.add_argument("--out", type=Path, help="where to write (default: the first DIR)")
    args = parser.parse_args(argv)
    try:
        rebuild(args.dirs, args.out or args.dirs[0])
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
