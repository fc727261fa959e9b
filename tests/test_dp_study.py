"""The DP study's report (experiments/dp_study.py): runs tagged by their directory's target
epsilon, a table row per run, the summary and the two plots written."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import dp_study


def fake_run(root: Path, eps: float | None, accs: dict[str, float], rounds: int = 3) -> Path:
    """A run directory as the runner leaves it: config.json and one history file per algorithm."""
    d = root / f"eps_{eps}"
    (d / "history").mkdir(parents=True)
    dp = {"enabled": eps is not None, "target_epsilon": eps or 0.0}
    (d / "config.json").write_text(json.dumps({"rounds": rounds, "dp": dp}))
    for alg, acc in accs.items():
        rows = []
        for r in range(1, rounds + 1):
            row = {
                "setting": "s",
                "algorithm": alg,
                "seed": 0,
                "round": r,
                "seconds": 1.0,
                "wall": r,
            }
            row.update(train_loss=1.0, client_acc=acc if r == rounds else None)
            if eps is not None:
                row.update(epsilon=eps * r / rounds, dp_clip=1.0 / r)
            rows.append(json.dumps(row))
        (d / "history" / f"s__{alg}__seed0.jsonl").write_text("\n".join(rows) + "\n")
    return d


def test_report_tags_runs_with_their_epsilon_and_writes_table_summary_and_plots(
    tmp_path: Path, capsys: object
) -> None:
    dirs = [
        fake_run(tmp_path, None, {"fedbn": 0.8, "fedavg": 0.7}),
        fake_run(tmp_path, 4.0, {"fedbn": 0.5, "fedavg": 0.4}),
        fake_run(tmp_path, 1.0, {"fedbn": 0.3, "fedavg": 0.2}),
    ]
    runs, _ = dp_study.gather(dirs)
    got = {(r["algorithm"], r["target_epsilon"]): r for r in runs}
    assert got["fedbn", None]["client_acc"] == 0.8 and got["fedavg", 1.0]["client_acc"] == 0.2
    assert got["fedbn", 4.0]["epsilon"] == 4.0 and got["fedbn", 4.0]["dp_clip"] == 1.0 / 3
    assert got["fedbn", None].get("epsilon") is None
    out = tmp_path / "report"
    assert dp_study.main([*map(str, dirs), "--out", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()  # type: ignore[attr-defined]
    assert len(table) == 2 + 6 and all(line.startswith("|") for line in table)
    assert sum("no DP" in line for line in table) == 2
    assert {p.name for p in out.iterdir()} == {
        "summary.json",
        "dp_accuracy_vs_epsilon.png",
        "dp_clip.png",
    }
    assert len(json.loads((out / "summary.json").read_text())["runs"]) == 6


def test_report_refuses_directories_without_history(tmp_path: Path) -> None:
    empty = tmp_path / "eps_1"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"rounds": 1, "dp": {"enabled": False}}))
    assert dp_study.main([str(empty), "--out", str(tmp_path / "out")]) == 2
