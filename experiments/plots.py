"""The plots of a run's history: accuracy, BN divergence and task metrics per setting, one curve
per algorithm (mean and spread over seeds), and each client's final accuracy per algorithm."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from experiments.history import Row, metric_columns, source_notes, source_tag  # noqa: E402


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


def final_client_accs(rows: Sequence[Row]) -> dict[int, dict[int, float]]:
    """{seed: {client: accuracy}} from each seed's last row that has ``client_accs``."""
    out: dict[int, dict[int, float]] = {}
    for r in sorted(rows, key=lambda r: r["round"]):
        if r.get("client_accs"):
            out[r["seed"]] = {int(c): a for c, a in r["client_accs"].items() if a is not None}
    return out


def _client_figure(path: Path, setting: str, rows_by_alg: dict[str, list[Row]]) -> Path | None:
    """A box per algorithm of its clients' final own-model accuracies (all seeds pooled), each
    client a dot colored by its index; None when no row holds ``client_accs``."""
    finals = {alg: final_client_accs(rows) for alg, rows in rows_by_alg.items()}
    finals = {alg: f for alg, f in finals.items() if f}
    if not finals:
        return None
    fig, ax = plt.subplots(figsize=(1.1 * len(finals) + 3.0, 4.8), layout="constrained")
    algs = list(finals)
    values = [[a for accs in finals[alg].values() for a in accs.values()] for alg in algs]
    black = {"color": "black", "markerfacecolor": "black", "markeredgecolor": "black"}
    ax.boxplot(
        values,
        tick_labels=algs,
        showmeans=True,
        whis=(0, 100),
        widths=0.6,
        zorder=2,
        medianprops={"color": "black"},
        meanprops={"marker": "^", **black},
    )
    rng = np.random.default_rng(0)
    clients = sorted({c for f in finals.values() for accs in f.values() for c in accs})
    for i, alg in enumerate(algs, start=1):
        for accs in finals[alg].values():
            for c, a in accs.items():
                x = i + rng.uniform(-0.22, 0.22)
                ax.scatter(x, a, s=14, color=f"C{clients.index(c) % 10}", alpha=0.7, zorder=3)
    seeds = max(len(f) for f in finals.values())
    ax.set_title(
        f"{setting}: each client's final accuracy on its own test data, own model\n"
        f"({seeds} seed{'s' if seeds > 1 else ''} pooled; dot color = client index; "
        "box: quartiles, whiskers min-max, triangle: mean)",
        fontsize=10,
    )
    ax.set_ylabel("accuracy")
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_setting(out_dir: Path, setting: str, rows_by_alg: dict[str, list[Row]]) -> list[Path]:
    """accuracy_<setting>.png and bn_divergence_<setting>.png, metrics_<setting>.png when the
    task has metrics besides accuracy, clients_<setting>.png when the rows hold each client's
    accuracy; returns their paths."""
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    extra = metric_panels(rows_by_alg)
    if extra:
        title = f"{setting}: task metrics vs round"
        metrics = [_figure(plots / f"metrics_{setting}.png", title, rows_by_alg, extra)]
    else:
        metrics = []
    clients = _client_figure(plots / f"clients_{setting}.png", setting, rows_by_alg)
    return (
        metrics
        + ([clients] if clients else [])
        + [
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
    )
