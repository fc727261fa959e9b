"""A sweep's results over its grid: one CSV and one plot per swept setting.

A grid's runs are labelled ``<setting>@<field>=<value>,...`` (``experiments/sweep.py``). For
each swept setting this writes ``sweep_<setting>.csv`` (a row per point and algorithm: the
swept values, then the final accuracy and loss, mean and std over seeds) and
``plots/sweep_<setting>.png``: the final accuracy against the first swept field, one line per
value of the others, a panel per algorithm (its global accuracy, or its mean client accuracy
when it has no global model), error bars over seeds when there are several.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from experiments.history import Row, split_label  # noqa: E402

Results = dict[str, dict[str, dict[str, Any]]]  # report.aggregate's {label: {alg: stats}}
COLUMNS = ("global_acc", "client_acc", "train_loss")


def parse_point(point: str) -> dict[str, float]:
    """``'optim.lr=0.001,mu=0.01'`` -> ``{'optim.lr': 0.001, 'mu': 0.01}`` (sweep.label's text)."""
    out = {}
    for item in point.split(","):
        field, _, value = item.partition("=")
        out[field] = float(value)
    return out


def grid_rows(results: Results) -> dict[str, list[Row]]:
    """{setting: rows}, a row per (point, algorithm) of each swept setting: the swept fields'
    values, ``algorithm``, ``seeds`` and each of :data:`COLUMNS` as ``<name>_mean/_std``."""
    out: dict[str, list[Row]] = defaultdict(list)
    for label, per_alg in results.items():
        setting, point = split_label(label)
        if not point:
            continue
        for alg, stats in per_alg.items():
            row: Row = {**parse_point(point), "algorithm": alg, "seeds": len(stats["seeds"])}
            for name in COLUMNS:  # every run summary has them (history.FINAL_METRICS)
                row[f"{name}_mean"], row[f"{name}_std"] = stats[name]["mean"], stats[name]["std"]
            out[setting].append(row)
    return dict(out)


def fields_of(rows: list[Row]) -> list[str]:
    """The swept fields of a setting's rows, in sweep order (the columns before ``algorithm``)."""
    keys = list(rows[0])
    return keys[: keys.index("algorithm")]


def write_csv(path: Path, rows: list[Row]) -> Path:
    """The rows as CSV (empty cells where a value is missing)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def accuracy_key(rows: list[Row]) -> str:
    """``global_acc``, or ``client_acc`` when no run has a global model (FedBN, SiloBN)."""
    return "global_acc" if any(r["global_acc_mean"] is not None for r in rows) else "client_acc"


def plot_grid(path: Path, setting: str, rows: list[Row]) -> Path:
    """Final accuracy against the first swept field: a panel per algorithm (its global accuracy,
    or its mean client accuracy without a global model), a line per value of the other swept
    fields, error bars (std over seeds) where a point has several seeds."""
    x_field, *others = fields_of(rows)
    algs = list(dict.fromkeys(r["algorithm"] for r in rows))
    fig, axes = plt.subplots(
        1, len(algs), figsize=(5.0 * len(algs), 4.0), squeeze=False, layout="constrained"
    )
    xs = sorted({r[x_field] for r in rows})
    for ax, alg in zip(axes[0], algs, strict=True):
        mine = [r for r in rows if r["algorithm"] == alg]
        key = accuracy_key(mine)
        lines: dict[tuple, list[Row]] = defaultdict(list)
        for r in mine:
            if r[f"{key}_mean"] is not None:
                lines[tuple(r[f] for f in others)].append(r)
        for rest, line in lines.items():
            line.sort(key=lambda r: r[x_field])
            label = ", ".join(f"{f}={v:g}" for f, v in zip(others, rest, strict=True))
            ax.errorbar(
                [r[x_field] for r in line],
                [r[f"{key}_mean"] for r in line],
                yerr=[r[f"{key}_std"] for r in line],  # 0 with one seed
                marker="o",
                capsize=3,
                label=label or None,
            )
        if min(xs) > 0 and max(xs) >= 10 * min(xs):
            ax.set_xscale("log")
        ax.set(title=alg, xlabel=x_field, ylabel=f"final {key.replace('_', ' ')}")
        ax.grid(alpha=0.3)
        if others and lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{setting} sweep: final accuracy vs {x_field}")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_sweeps(out: Path, results: Results) -> list[Path]:
    """``sweep_<setting>.csv`` and ``plots/sweep_<setting>.png`` per swept setting; their paths."""
    paths = []
    for setting, rows in grid_rows(results).items():
        (out / "plots").mkdir(parents=True, exist_ok=True)
        paths.append(write_csv(out / f"sweep_{setting}.csv", rows))
        paths.append(plot_grid(out / "plots" / f"sweep_{setting}.png", setting, rows))
    return paths
