"""What a run leaves behind: per-round history (JSON lines), summary JSON, table, PNG plots."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Row = dict[str, Any]
FINAL_METRICS = ("global_acc", "client_acc", "train_loss", "bn_div", "probe_div", "affine_div")
# Columns every history row has; any other ``train_<name>``/``global_<name>`` is a task metric.
BUILTIN_COLUMNS = frozenset({"train_loss", "train_acc", "global_loss", "global_acc"})
DP_METRICS = ("epsilon", "dp_clip")  # DP runs only: epsilon after the round, the clip it set


def dp_columns(rows: Iterable[Row]) -> list[str]:
    """The DP columns present in ``rows`` (none for a run without DP)."""
    keys = {k for r in rows for k in r}
    return [k for k in DP_METRICS if k in keys]


def metric_columns(rows: Iterable[Row]) -> list[str]:
    """The task-metric columns (``train_<name>``, ``global_<name>``) of ``rows``, besides the
    built-in ones, in first-seen order."""
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith(("train_", "global_")))
    return [k for k in keys if k not in BUILTIN_COLUMNS]


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

    def __init__(self, path: Path, *, append: bool = False) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: TextIO = path.open("a" if append else "w")

    def write(self, row: Row) -> None:
        """Write one row and flush it, so an interrupted run keeps every finished round."""
        self._file.write(json.dumps(clean(row)) + "\n")
        self._file.flush()

    def offset(self) -> int:
        """Bytes written so far (where a resumed run cuts the file back to)."""
        return self._file.tell()

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
    keys = (*FINAL_METRICS, *metric_columns(rows), *dp_columns(rows))
    out = {k: last_value(rows, k) for k in keys}
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
        metrics = (*FINAL_METRICS, *metric_columns(group), *dp_columns(group), "sec_per_round")
        out[setting][alg] = {m: mean_std(r.get(m) for r in group) for m in metrics}
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
    ("BN div [stats]", "bn_div", ".3g"),
    ("s/round", "sec_per_round", ".3f"),
)

# The statistics a row's ``bn_div`` was computed from (its ``bn_div_source``, see
# ``fedjax_bn.monitor.stats_source``): the tag shown next to each value, and what it means.
BN_SOURCES: dict[str, tuple[str, str]] = {
    "probe": ("probe", "batch statistics of a fixed probe batch through each client's model"),
    "local": ("running", "each client's own BN running statistics (kept local)"),
    "round": ("post-round", "clients' running statistics after local training, before pooling"),
}


def source_tag(source: str | None) -> str:
    """``'[probe]'`` for a ``bn_div_source`` (``'probe/running'`` if mixed), '' when unknown."""
    if not source:
        return ""
    return "[" + "/".join(BN_SOURCES.get(s, (s, ""))[0] for s in source.split("/")) + "]"


def source_notes(sources: Iterable[str | None]) -> list[str]:
    """One ``[tag] meaning`` line per distinct source in ``sources``, in first-seen order."""
    seen = dict.fromkeys(s for src in sources if src for s in src.split("/"))
    return [f"{source_tag(s)} = {BN_SOURCES.get(s, (s, 'unknown source'))[1]}" for s in seen]


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


def _finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, NaN or infinite."""
    if value is None:
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _curves(rows: Sequence[Row], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(round, mean, std) over seeds of ``key`` at the rounds where it was recorded."""
    by_round: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if (v := _finite(r.get(key))) is not None:
            by_round[r["round"]].append(v)
    if not by_round:
        return None
    rounds = np.array(sorted(by_round))
    vals = [by_round[k] for k in rounds]
    return rounds, np.array([np.mean(v) for v in vals]), np.array([np.std(v) for v in vals])


class Panel(NamedTuple):
    """One subplot: the row ``key`` it draws, its title and y label, and how."""

    key: str
    title: str
    ylabel: str
    log: bool = False
    missing: str = "no data"  # why an algorithm has no curve here
    tagged: bool = False  # label curves with the statistics they come from (bn_div_source)
    share: str = ""  # panels of one figure with the same share name get one y range


LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def _style(i: int) -> dict[str, Any]:
    """Algorithm ``i``'s look in every panel: a color, line style and hollow marker of its own;
    earlier algorithms are drawn wider and below, so a curve under another still shows."""
    color = f"C{i % 10}"
    return {
        "color": color,
        "linestyle": LINESTYLES[i % len(LINESTYLES)],
        "marker": MARKERS[i % len(MARKERS)],
        "linewidth": max(3.0 - 0.6 * i, 1.2),
        "markersize": max(9.0 - 1.2 * i, 4.0),
        "markerfacecolor": "none",
        "markeredgecolor": color,
        "zorder": 3 + i,
    }


def _markevery(n: int, i: int, count: int) -> tuple[int, int]:
    """About 8 markers per curve, algorithm ``i`` of ``count`` on rounds no other one marks;
    every point when the curve is too short for that (then nested marker sizes tell them apart)."""
    if n < 2 * count:
        return 0, 1
    step = max(count, math.ceil(n / 8))
    return i % step, step


def _label(alg: str, rows: Sequence[Row], panel: Panel) -> str:
    """``'fedavg [probe] (mean ± std over 3 seeds)'``."""
    tag = source_tag(_sources(rows)) if panel.tagged else ""
    seeds = len({r["seed"] for r in rows if _finite(r.get(panel.key)) is not None})
    spread = f"mean ± std over {seeds} seeds" if seeds > 1 else "1 seed"
    return f"{alg}{' ' + tag if tag else ''} ({spread})"


def _sources(rows: Sequence[Row]) -> str | None:
    """The distinct ``bn_div_source`` values of ``rows``, joined with '/' (None if none)."""
    found = dict.fromkeys(r["bn_div_source"] for r in rows if r.get("bn_div_source"))
    return "/".join(found) or None


def _draw(ax: Any, i: int, count: int, curve: tuple[np.ndarray, ...], label: str) -> Any:
    """One algorithm's mean line with its seed band; the legend handle for both."""
    x, mean, std = curve
    style = _style(i)
    (line,) = ax.plot(x, mean, markevery=_markevery(len(x), i, count), label=label, **style)
    if not np.any(std > 0):
        return line
    band = ax.fill_between(
        x, mean - std, mean + std, color=style["color"], alpha=0.15, linewidth=0, zorder=2
    )
    return (band, line)


def _panel(ax: Any, rows_by_alg: dict[str, list[Row]], panel: Panel) -> bool:
    """Draw ``panel`` on ``ax``; the legend lists only what is drawn. Returns whether any was."""
    handles, labels, missing, means = [], [], [], []
    for i, (alg, rows) in enumerate(rows_by_alg.items()):
        curve = _curves(rows, panel.key)
        if curve is None:
            missing.append(alg)
            continue
        means += list(curve[1])
        label = _label(alg, rows, panel)
        handles.append(_draw(ax, i, len(rows_by_alg), curve, label))
        labels.append(label)
    title = panel.title
    if handles and missing:
        title += f"\n({panel.missing}: {', '.join(missing)})"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("round")
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if not handles:
        ax.text(0.5, 0.5, panel.missing, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return False
    ax.legend(
        handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False
    )
    values = [v for rs in rows_by_alg.values() for r in rs if (v := _finite(r.get(panel.key)))]
    if panel.log and values and min(values) > 0:
        ax.set_yscale("log")
        bottom, top = ax.get_ylim()  # a band reaching towards 0 must not squash the curves
        ax.set_ylim(max(bottom, min(means) / 4), top)
    return True


def _share_y(axes: Sequence[Any], panels: Sequence[Panel], drawn: Sequence[bool]) -> None:
    """One y range for the drawn panels of each ``share`` group."""
    groups: dict[str, list[Any]] = defaultdict(list)
    for ax, panel, ok in zip(axes, panels, drawn, strict=True):
        if panel.share and ok:
            groups[panel.share].append(ax)
    for group in groups.values():
        if len({ax.get_yscale() for ax in group}) > 1:  # a log and a linear panel: leave them
            continue
        lows, highs = zip(*(ax.get_ylim() for ax in group), strict=True)
        for ax in group:
            ax.set_ylim(min(lows), max(highs))


ACCURACY_PANELS = (
    Panel(
        "global_acc",
        "global model, pooled test set",
        "accuracy",
        missing="no global model",
        share="acc",
    ),
    Panel("client_acc", "mean per-client accuracy (local BN)", "accuracy", share="acc"),
)
DIVERGENCE_PANELS = (
    Panel(
        "bn_div",
        "clients' BN statistics [source]",
        "divergence (mean pairwise W2²)",
        True,
        tagged=True,
        share="w2",
    ),
    Panel(
        "probe_div",
        "probe-batch feature statistics",
        "divergence (mean pairwise W2²)",
        True,
        share="w2",
    ),
    Panel(
        "affine_div",
        "local BN scale/bias",
        "divergence (mean pairwise squared L2)",
        True,
        missing="BN scale/bias not local",
    ),
)


def _figure(
    path: Path, title: str, rows_by_alg: dict[str, list[Row]], panels: Sequence[Panel]
) -> Path:
    """One row of ``panels`` saved to ``path``; a footnote explains the statistics tags."""
    height = 4.0 + 0.22 * len(rows_by_alg)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(5.5 * len(panels), height), squeeze=False, layout="constrained"
    )
    drawn = [_panel(ax, rows_by_alg, p) for ax, p in zip(axes[0], panels, strict=True)]
    _share_y(axes[0], panels, drawn)
    fig.suptitle(title)
    if any(p.tagged for p in panels):
        rows = [r for rs in rows_by_alg.values() for r in rs]
        notes = source_notes(r.get("bn_div_source") for r in rows)
        fig.supxlabel("clients' BN statistics: " + ";  ".join(notes), fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def metric_panels(rows_by_alg: dict[str, list[Row]]) -> tuple[Panel, ...]:
    """One panel per task-metric column (``train_<name>``, ``global_<name>``) with values."""
    rows = [r for rs in rows_by_alg.values() for r in rs]
    keys = [k for k in metric_columns(rows) if any(r.get(k) is not None for r in rows)]
    return tuple(
        Panel(k, k.replace("_", " ", 1), k.split("_", 1)[1], missing="not evaluated") for k in keys
    )


def plot_setting(out_dir: Path, setting: str, rows_by_alg: dict[str, list[Row]]) -> list[Path]:
    """accuracy_<setting>.png and bn_divergence_<setting>.png, and metrics_<setting>.png when
    the task has metrics besides accuracy; returns their paths."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    extra = metric_panels(rows_by_alg)
    if extra:
        title = f"{setting}: task metrics vs round"
        metrics = [_figure(plots / f"metrics_{setting}.png", title, rows_by_alg, extra)]
    else:
        metrics = []
    return metrics + [
        _figure(
            plots / f"accuracy_{setting}.png",
            f"{setting}: accuracy vs round",
            rows_by_alg,
            ACCURACY_PANELS,
        ),
        _figure(
            plots / f"bn_divergence_{setting}.png",
            f"{setting}: BN divergence between clients vs round",
            rows_by_alg,
            DIVERGENCE_PANELS,
        ),
    ]


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
