"""``experiments.report``: a rebuilt study lists its runs in the order the runner trained them."""

from __future__ import annotations

import json
from pathlib import Path

from experiments import report


def write_run(out: Path, setting: str, alg: str, seed: int) -> None:
    path = report.history_path(out, setting, alg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {"setting": setting, "algorithm": alg, "seed": seed, "round": 1, "global_acc": 0.5}
    row |= {"seconds": 0.1, "wall": 0.1}
    path.write_text(json.dumps(row) + "\n")


def test_runs_come_back_in_the_configs_order_not_by_file_name(tmp_path: Path) -> None:
    config = {"settings": ["s2", "s1"], "seeds": [1, 0], "algorithms": ["fedprox", "fedavg"]}
    (tmp_path / "config.json").write_text(json.dumps(config | {"rounds": 1}))
    runs = [
        (setting, seed, alg)
        for setting in ("s1", "s2@optim.lr=0.1", "s2", "other")
        for seed in (0, 1)
        for alg in ("fedavg", "fedprox")
    ]
    for setting, seed, alg in runs:
        write_run(tmp_path, setting, alg, seed)
    got = [(r["setting"], r["seed"], r["algorithm"]) for r in report.collect([tmp_path])[0]]
    want = [
        ("s2@optim.lr=0.1", 1, "fedprox"),  # a sweep point with its setting, by file name
        ("s2", 1, "fedprox"),
        ("s2@optim.lr=0.1", 1, "fedavg"),
        ("s2", 1, "fedavg"),
    ]
    assert got[:4] == want
    assert [r[0] for r in got[8:12]] == ["s1"] * 4
    assert [r[0] for r in got[12:]] == ["other"] * 4  # not in the config: last
    assert all(r["complete"] for r in report.collect([tmp_path])[0])


def test_without_a_config_runs_come_back_by_file_name(tmp_path: Path) -> None:
    for alg in ("fedprox", "fedavg"):
        write_run(tmp_path, "s", alg, 0)
    got = [r["algorithm"] for r in report.collect([tmp_path])[0]]
    assert got == ["fedavg", "fedprox"]
