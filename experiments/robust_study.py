"""The robust-aggregation study: every attack kind on each data set, then its table and plot.

Each (data set, attack kind) is one run of ``experiments/configs/robust.py`` in its own
directory ``OUT/<data>/<kind>``; a finished one is skipped, an interrupted one resumed, so the
command can be rerun after any interruption. ``--smoke`` runs one round of the whole grid.

    python -m experiments.robust_study --out=experiments/runs/robust
    python -m experiments.robust_study --out=experiments/runs/robust_smoke --smoke

Writes ``OUT/study.json`` (final global accuracy and BN divergence per cell, wall times),
``OUT/tables.md`` and ``OUT/robust_<data>.png`` (accuracy heatmaps: algorithm by attack).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import runner  # noqa: E402
from experiments.configs import robust  # noqa: E402

KINDS = ("none", "sign_flip", "scale", "gaussian", "label_flip")
DATA = ("digits", "fashion_mnist")
# The attack kinds each data set runs unless --kinds says otherwise (sized for a 2-core CPU).
DEFAULT_KINDS = {"digits": KINDS, "fashion_mnist": ("none", "scale", "gaussian")}


def cell_config(data: str, kind: str, out: Path, smoke: bool) -> Any:
    """The config of one (data set, attack kind) cell."""
    c = robust.get_config(data)
    c.attack.kind = kind
    c.out_dir = str(out / data / kind)
    if smoke:
        c.rounds, c.eval_every = 1, 1
    return c


def run_cell(config: Any) -> dict[str, Any]:
    """Run (or resume, or skip when finished) one cell; its ``summary.json``."""
    out = Path(config.out_dir)
    if not (out / "summary.json").exists():
        runner.run_experiment(config, resume=(out / "config.json").exists())
    return json.loads((out / "summary.json").read_text())


def cell_results(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{algorithm: {global_acc, bn_div, wall_sec}}`` of one cell's summary."""
    return {
        r["algorithm"]: {
            "global_acc": r.get("global_acc"),
            "bn_div": r.get("bn_div"),
            "wall_sec": r.get("wall_sec"),
            "attackers": r.get("attackers", []),
        }
        for r in summary["runs"]
    }


def _acc(cell: dict[str, Any], alg: str) -> str:
    value = cell.get(alg, {}).get("global_acc")
    return "n/a" if value is None else f"{value:.3f}"


def table(data: str, cells: dict[str, dict[str, Any]]) -> str:
    """A Markdown table: one row per rule, one column per attack; each robust cell reads
    ``BN by the rule / BN averaged``."""
    kinds = [k for k in KINDS if k in cells]
    lines = [
        f"**{data}** (global accuracy, BN statistics by the rule / averaged)",
        "",
        "| rule | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
        "| fedavg (mean) | " + " | ".join(_acc(cells[k], "fedavg") for k in kinds) + " |",
    ]
    ran = {a for cell in cells.values() for a in cell}
    for rule in robust.RULES:
        a, b = f"fedavg_{rule}", f"fedavg_{rule}_bnavg"
        if a not in ran and b not in ran:
            continue
        row = [f"{_acc(cells[k], a)} / {_acc(cells[k], b)}" for k in kinds]
        lines.append(f"| {rule} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def heatmap(path: Path, data: str, cells: dict[str, dict[str, Any]]) -> None:
    """Global accuracy, algorithm (rows) by attack kind (columns), numbers written in."""
    kinds = [k for k in KINDS if k in cells]
    ran, config = {a for cell in cells.values() for a in cell}, robust.get_config(data)
    algs = [a for a in config.algorithms if a in ran]
    acc = np.array(
        [[cells[k].get(a, {}).get("global_acc") or np.nan for k in kinds] for a in algs], float
    )
    fig, ax = plt.subplots(figsize=(max(1.3 * len(kinds) + 3, 6.5), 0.42 * len(algs) + 1.5))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, j in np.ndindex(acc.shape):
        text = "n/a" if np.isnan(acc[i, j]) else f"{acc[i, j]:.2f}"
        ax.text(j, i, text, ha="center", va="center", color="w" if acc[i, j] < 0.6 else "k")
    ax.set_xticks(range(len(kinds)), kinds)
    labels = [a.removeprefix("fedavg_").replace("_bnavg", " (BN avg)") for a in algs]
    ax.set_yticks(range(len(algs)), labels)
    ax.set_title(f"{data}: final global accuracy, {config.attack.fraction:.0%} attackers")
    fig.colorbar(im, ax=ax, fraction=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/runs/robust")
    parser.add_argument("--data", default=",".join(DATA))
    parser.add_argument("--kinds", default="", help="attack kinds (default: DEFAULT_KINDS)")
    parser.add_argument("--smoke", action="store_true", help="one round of every cell")
    args = parser.parse_args(argv)
    out = Path(args.out)
    study: dict[str, Any] = {}
    t0 = time.perf_counter()
    for data in args.data.split(","):
        cells = {}
        for kind in args.kinds.split(",") if args.kinds else DEFAULT_KINDS[data]:
            cells[kind] = cell_results(run_cell(cell_config(data, kind, out, args.smoke)))
        study[data] = cells
        heatmap(out / f"robust_{data}.png", data, cells)
    study["wall_sec_this_invocation"] = time.perf_counter() - t0
    (out / "study.json").write_text(json.dumps(study, indent=2) + "\n")
    tables = "\n\n".join(table(d, study[d]) for d in args.data.split(","))
    (out / "tables.md").write_text(tables + "\n")
    print(tables)


if __name__ == "__main__":
    main()
