"""The compression study's table and plot from a run directory's histories: final global
accuracy against total uplink bytes, and accuracy against cumulative uplink bytes (log x).

    python -m experiments.compression_report RUN_DIR [RUN_DIR ...] --out DIR
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.history import Row, read_history  # noqa: E402

MB = 1e6


def runs_by_algorithm(run_dirs: Sequence[Path], setting: str) -> dict[str, list[list[Row]]]:
    """{algorithm: [one history per seed]} of ``setting`` over ``run_dirs``, in file order."""
    out: dict[str, list[list[Row]]] = defaultdict(list)
    for run_dir in run_dirs:
        for path in sorted((run_dir / "history").glob(f"{setting}__*.jsonl")):
            rows = read_history(path)
            if rows:
                out[rows[0]["algorithm"]].append(rows)
    return dict(out)


def curve(rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
    """(cumulative uplink bytes, global accuracy) at the evaluated rounds of one run."""
    sent = np.cumsum([r["uplink_bytes"] for r in rows])
    done = [(s, r["global_acc"]) for s, r in zip(sent, rows, strict=True) if r["global_acc"]]
    return np.array([d[0] for d in done], float), np.array([d[1] for d in done], float)


def total_uplink(seeds: Sequence[Sequence[Row]]) -> np.ndarray:
    """Each seed's uplink bytes summed over its rounds."""
    return np.array([sum(r["uplink_bytes"] for r in rows) for rows in seeds], float)


def table(runs: dict[str, list[list[Row]]]) -> str:
    """Markdown: per algorithm, client uplink per round, total uplink, final global accuracy."""
    lines = [
        "| algorithm | uplink / client / round | total uplink | none / this | final global acc |",
        "|---|---|---|---|---|",
    ]
    plain = total_uplink(runs["fedavg"]).mean() if "fedavg" in runs else float("nan")
    by_bytes = sorted(runs.items(), key=lambda item: -total_uplink(item[1]).mean())
    for alg, seeds in by_bytes:
        total = total_uplink(seeds).mean()
        per = seeds[0][0]["uplink_bytes"] / len(seeds[0][0]["cohort"])
        acc = np.array([rows[-1]["global_acc"] for rows in seeds])
        spread = f" ± {acc.std():.3f}" if len(acc) > 1 else ""
        lines.append(
            f"| {alg} | {per / 1e3:.1f} kB | {total / MB:.2f} MB | {plain / total:.1f}x | "
            f"{acc.mean():.3f}{spread} (n={len(acc)}) |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, list[list[Row]]], setting: str, path: Path) -> None:
    """Left: accuracy against cumulative uplink bytes (mean over seeds); right: final accuracy
    against total uplink bytes, one point per algorithm (bars: std over seeds)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for i, (alg, seeds) in enumerate(runs.items()):
        style = {"color": plt.cm.tab10(i % 10), "marker": "osD^v<>ph*"[i % 10]}
        curves = [curve(rows) for rows in seeds]
        n = min(len(c[0]) for c in curves)
        x = np.mean([c[0][:n] for c in curves], axis=0)
        y = np.mean([c[1][:n] for c in curves], axis=0)
        left.plot(x / MB, y, label=alg, ms=4, **style)
        total = total_uplink(seeds) / MB
        acc = np.array([rows[-1]["global_acc"] for rows in seeds])
        right.errorbar(total.mean(), acc.mean(), yerr=acc.std(), capsize=3, label=alg, **style)
    for ax, title in ((left, "accuracy vs cumulative uplink"), (right, "final accuracy")):
        ax.set_xscale("log")
        ax.set_xlabel("uplink MB (all clients, log scale)")
        ax.set_ylabel("global test accuracy")
        ax.set_title(f"{setting}: {title}")
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Print each setting's table; write ``accuracy_vs_uplink_<setting>.png`` to ``--out``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dirs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, help="where the plots go (default: the first dir)")
    args = parser.parse_args(argv)
    out = args.out or args.run_dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    paths = [p for d in args.run_dirs for p in (d / "history").glob("*.jsonl")]
    for setting in sorted({p.name.split("__")[0] for p in paths}):
        runs = runs_by_algorithm(args.run_dirs, setting)
        print(f"\n{setting}\n\n{table(runs)}")
        plot(runs, setting, out / f"accuracy_vs_uplink_{setting}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
