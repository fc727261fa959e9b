"""DP options of the experiment runner (their bounds are in test_runner.BAD_VALUES): a refused
algorithm named, epsilon per history row, in the summary and the table."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_runner import tiny_argv

from experiments import report, run
from fedjax_bn.privacy import accountant


def test_dp_refused_for_scaffold_in_the_runner(tmp_path: Any, capsys: Any) -> None:

    argv = tiny_argv(tmp_path / "o", "--config.dp.enabled=True", algorithms="scaffold")
    assert run.main(argv) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "SCAFFOLD" in err[0]


def test_dp_run_reports_epsilon_per_round_and_in_the_summary(tmp_path: Any, capsys: Any) -> None:

    out = tmp_path / "out"
    extra = ("--config.dp.enabled=True", "--config.dp.q=0.5", "--config.dp.target_epsilon=8")
    argv = tiny_argv(out, "--config.rounds=3", *extra, algorithms="fedbn")
    assert run.main(argv) == 0
    rows = report.read_history(report.history_path(out, "digits_feature_shift", "fedbn", 0))
    eps = [r["epsilon"] for r in rows]
    assert eps == sorted(eps) and len(set(eps)) == 3
    z = accountant.calibrate_noise(8.0, 3, 1 / 4, num_clients=4, q=0.5)
    assert eps[-1] == pytest.approx(accountant.epsilon(z, 3, 1 / 4, num_clients=4, q=0.5))
    assert eps[-1] <= 8.0 + 1e-6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["runs"][0]["epsilon"] == pytest.approx(eps[-1])
    written = json.loads((out / "config.json").read_text())["dp"]
    assert written["noise_multiplier"] == pytest.approx(z)  # the calibrated noise, not 1.0
    assert "epsilon" in capsys.readouterr().out  # the table's column
