"""The DP study's report (``docs/privacy.md``): one run directory per target epsilon in, a
table of final accuracy, epsilon and clip per algorithm, ``summary.json`` and two plots out.

``python -m experiments.dp_study DIR [DIR ...] --out OUT`` (each DIR made by
``experiments/configs/dp.py:<epsilon>``; its ``config.json`` says the target epsilon).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments import plots
from experiments.history import Row, write_json
from experiments.report import collect

plt = plots.plt  # pyplot with the Agg backend plots.py selects


def _no_dp_x(epsilons: Sequence[float]) -> float:
    """Where a DP study's no-DP runs sit on the epsilon axis: one octave right of the largest."""
    return 2 * max(epsilons, default=1.0)


def plot_dp_study(out: Path, runs: Sequence[Row], rows: Sequence[Row]) -> list[Path]:
    """``dp_accuracy_vs_epsilon.png`` (final per-client accuracy of each algorithm against the
    run's target epsilon, no DP at the right) and ``dp_clip.png`` (adaptive clipping's clip per
    round, one panel per epsilon) of a DP study; every run summary and row carries its
    ``target_epsilon`` (None without DP). Runs that did not finish have no accuracy point."""
    out.mkdir(parents=True, exist_ok=True)
    algs = list(dict.fromkeys(r["algorithm"] for r in runs))
    eps = sorted({r["target_epsilon"] for r in runs if r["target_epsilon"] is not None})
    fig, ax = plt.subplots(figsize=(6.5, 4.5), layout="constrained")
    for i, alg in enumerate(algs):
        pts: dict[float, list[float]] = defaultdict(list)
        for r in runs:
            acc = plots._finite(r.get("client_acc")) if r.get("complete", True) else None
            if r["algorithm"] == alg and acc is not None:
                e = r["target_epsilon"]
                pts[_no_dp_x(eps) if e is None else e].append(acc)
        xs = sorted(pts)
        ax.plot(xs, [np.mean(pts[x]) for x in xs], label=alg, **plots._style(i))
    ax.set_xscale("log")
    ax.set_xticks([*eps, _no_dp_x(eps)], [*(f"{e:g}" for e in eps), "no DP"])
    ax.minorticks_off()
    ax.set_xlabel("target epsilon (delta = 1/N)")
    ax.set_ylabel("final mean per-client accuracy")
    ax.set_title("accuracy under user-level DP, per normalization policy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths = [out / "dp_accuracy_vs_epsilon.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, axes = plt.subplots(
        1, max(1, len(eps)), figsize=(4.5 * max(1, len(eps)), 4), squeeze=False, sharey=True,
        layout="constrained",
    )  # fmt: skip
    for ax, e in zip(axes[0], eps, strict=False):
        for i, alg in enumerate(algs):
            mine = [r for r in rows if r["algorithm"] == alg and r["target_epsilon"] == e]
            if (curve := plots._curves(mine, "dp_clip")) is not None:
                ax.plot(curve[0], curve[1], label=alg, **plots._style(i))
        ax.set_title(f"epsilon {e:g}")
        ax.set_xlabel("round")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clip norm (adaptive, median target)")
    axes[0][0].legend(fontsize=8)
    paths.append(out / "dp_clip.png")
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def target_epsilon(run_dir: Path) -> float | None:
    """The target epsilon of the run in ``run_dir`` (None: DP off)."""
    dp = json.loads((run_dir / "config.json").read_text()).get("dp") or {}
    return float(dp["target_epsilon"]) if dp.get("enabled") else None


def gather(dirs: Sequence[Path]) -> tuple[list[Row], list[Row]]:
    """(run summaries, rows) of every directory, each tagged with its ``target_epsilon``."""
    runs, rows = [], []
    for d in dirs:
        eps = target_epsilon(d)
        got_runs, got_rows = collect([d])
        runs += [{**r, "target_epsilon": eps} for r in got_runs]
        rows += [{**r, "target_epsilon": eps} for r in got_rows]
    return runs, rows


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def table(runs: Sequence[Row]) -> str:
    """A markdown table: one row per (algorithm, target epsilon), seeds listed apart."""
    head = "| algorithm | target ε | final ε | client acc | global acc | final clip | rounds |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    order = sorted(runs, key=lambda r: (r["algorithm"], -(r["target_epsilon"] or 1e9), r["seed"]))
    for r in order:
        eps = r["target_epsilon"]
        cells = [
            f"{r['algorithm']} (seed {r['seed']})",
            "no DP" if eps is None else f"{eps:g}",
            _fmt(r.get("epsilon"), ".2f"),
            _fmt(r.get("client_acc"), ".3f"),
            _fmt(r.get("global_acc"), ".3f"),
            _fmt(r.get("dp_clip"), ".3f"),
            f"{r['rounds']}{'' if r['complete'] else ' (incomplete)'}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``summary.json`` and the plots to ``--out``; print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="one run directory per epsilon")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs, rows = gather(args.dirs)
    if not runs:
        print(f"error: no history under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "summary.json", {"sources": [str(d) for d in args.dirs], "runs": runs})
    plot_dp_study(args.out, runs, rows)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
