"""What a run leaves behind: per-round history (JSON lines), summary JSON, table, PNG plots."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

Row = dict[str, Any]
FINAL_METRICS = ("global_acc", "client_acc", "train_loss", "bn_div", "probe_div", "affine_div")


def clean(value: Any) -> Any:
    """JSON-safe: numpy/jax scalars to floats, NaN/inf to None, containers recursively."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v) for v in value]
    if isinstance(value, str | bool | int) or value is None:
        return value
    x = float(value)
    return x if math.isfinite(x) else None


def history_path(out_dir: Path, setting: str, algorithm: str, seed: int) -> Path:
    """Where one run's per-round history lives."""
    return out_dir / "history" / f"{setting}__{algorithm}__seed{seed}.jsonl"


class HistoryWriter:
    """Appends one JSON object per round to a run's history file and flushes it every round."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = path.open("w")

    def write(self, row: Row) -> None:
        """Write one row and flush it, so an interrupted run keeps every finished round."""
        self._file.write(json.dumps(clean(row)) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_history(path: Path) -> list[Row]:
    """The rows of one history file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_value(rows: Sequence[Row], key: str) -> float | None:
    """The last non-null value of ``key`` over rows (e.g. the last evaluated accuracy)."""
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key]
    return None


def run_summary(rows: Sequence[Row]) -> Row:
    """Final metrics of one run; ``sec_per_round`` excludes round 1 (it compiles)."""
    seconds = [r["seconds"] for r in rows]
    steady = seconds[1:] or seconds
    out = {k: last_value(rows, k) for k in FINAL_METRICS}
    out.update(
        setting=rows[0]["setting"],
        algorithm=rows[0]["algorithm"],
        seed=rows[0]["seed"],
        rounds=len(rows),
        sec_per_round=float(np.mean(steady)),
        first_round_sec=seconds[0],
        wall_sec=rows[-1]["wall"],
        bn_div_source=rows[-1].get("bn_div_source"),
    )
    return out


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
        metrics = (*FINAL_METRICS, "sec_per_round")
        out[setting][alg] = {m: mean_std(r[m] for r in group) for m in metrics}
        out[setting][alg]["seeds"] = [r["seed"] for r in group]
        out[setting][alg]["bn_div_source"] = group[-1]["bn_div_source"]
    return dict(out)


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON (no NaN), indented."""
    path.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n")


def _cell(stat: dict[str, Any], fmt: str) -> str:
    if stat["mean"] is None:
        return "n/a"
    text = format(stat["mean"], fmt)
    return text + (f" ± {format(stat['std'], fmt)}" if len(stat["values"]) > 1 else "")


TABLE_COLUMNS = (
    ("global acc", "global_acc", ".3f"),
    ("client acc", "client_acc", ".3f"),
    ("final loss", "train_loss", ".3f"),
    ("BN div", "bn_div", ".3g"),
    ("s/round", "sec_per_round", ".3f"),
)


def format_table(setting: str, per_alg: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of one setting's final metrics (mean ± std over seeds)."""
    header = ["algorithm", *(c[0] for c in TABLE_COLUMNS)]
    body = [
        [alg, *(_cell(stats[key], fmt) for _, key, fmt in TABLE_COLUMNS)]
        for alg, stats in per_alg.items()
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *body]]
    seeds = max(len(s["seeds"]) for s in per_alg.values())
    title = f"{setting} ({seeds} seed{'s' if seeds > 1 else ''}"
    title += ", mean ± std)" if seeds > 1 else ")"
    return "\n".join([title, "-" * len(lines[0]), *lines])


def _curves(rows: Sequence[Row], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(round, mean, std) over seeds of ``key`` at the rounds where it was recorded."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(key) is not None:
            by_round[r["round"]].append(r[key])
    if not by_round:
        return None
    rounds = np.array(sorted(by_round))
    vals = [by_round[k] for k in rounds]
    return rounds, np.array([np.mean(v) for v in vals]), np.array([np.std(v) for v in vals])


def _panel(ax: Any, rows_by_alg: dict[str, list[Row]], key: str, title: str, log: bool) -> None:
    drawn = False
    for i, (alg, rows) in enumerate(rows_by_alg.items()):
        curve = _curves(rows, key)
        if curve is None:
            continue
        x, mean, std = curve
        color = f"C{i % 10}"  # one color per algorithm in every panel
        ax.plot(x, mean, marker="." if len(x) < 40 else None, label=alg, color=color)
        if np.any(std > 0):
            ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.2)
        drawn = True
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
        if log and all(v > 0 for rs in rows_by_alg.values() for r in rs if (v := r.get(key))):
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "not applicable", ha="center", va="center", transform=ax.transAxes)


def plot_setting(out_dir: Path, setting: str, rows_by_alg: dict[str, list[Row]]) -> list[Path]:
    """accuracy_<setting>.png and bn_divergence_<setting>.png; returns their paths."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    specs = [
        (
            f"accuracy_{setting}.png",
            [
                ("global_acc", "global model, pooled test set", False),
                ("client_acc", "mean per-client accuracy (local BN)", False),
            ],
            "accuracy",
        ),
        (
            f"bn_divergence_{setting}.png",
            [
                ("bn_div", "clients' BN statistics (mean pairwise W2²)", True),
                ("probe_div", "probe-batch feature statistics (W2²)", True),
                ("affine_div", "local BN scale/bias (squared L2)", True),
            ],
            "divergence",
        ),
    ]
    paths = []
    for name, panels, ylabel in specs:
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
        for ax, (key, title, log) in zip(axes[0], panels, strict=True):
            _panel(ax, rows_by_alg, key, title, log)
            ax.set_ylabel(ylabel)
        fig.suptitle(f"{setting}: {ylabel} vs round")
        fig.tight_layout()
        fig.savefig(plots / name, dpi=100)
        plt.close(fig)
        paths.append(plots / name)
    return paths


def collect(dirs: Sequence[Path]) -> tuple[list[Row], list[Row]]:
    """(run summaries, all rows) from every ``history/*.jsonl`` under ``dirs``; a run is
    ``complete`` when it reached its directory's ``config.json`` rounds."""
    runs, rows = [], []
    for d in dirs:
        config = d / "config.json"
        want = json.loads(config.read_text()).get("rounds") if config.exists() else None
        for path in sorted((d / "history").glob("*.jsonl")):
            run_rows = read_history(path)
            if not run_rows:
                continue
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
        plot_setting(out, setting, by_setting[setting])
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
