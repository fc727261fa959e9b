"""The DP study's report (``docs/privacy.md``): one run directory per target epsilon in, a
table of final accuracy, epsilon and clip per algorithm, ``summary.json`` and two plots out.

``python -m experiments.dp_study DIR [DIR ...] --out OUT`` (each DIR made by
``experiments/configs/dp.py:<epsilon>``; its ``config.json`` says the target epsilon).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import plots
from experiments.history import Row, write_json
from experiments.report import collect


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
    plots.plot_dp_study(args.out, runs, rows)
    print(table(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
