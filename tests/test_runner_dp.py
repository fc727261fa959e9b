"""DP options of the experiment runner: --config.dp.* validated with one error line each, a
refused algorithm named, epsilon per history row, in the summary and the table."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_runner import tiny_argv

from experiments import report, run, runner
from fedjax_bn.privacy import accountant

DP_BAD = [
    ("dp.noise_multiplier", "-1", ">= 0"),
    ("dp.clip_norm", "0", "> 0"),
    ("dp.q", "1.5", "[0, 1]"),
    ("dp.delta", "1", "[0, 1)"),
    ("dp.target_epsilon", "-2", ">= 0"),
]


@pytest.mark.parametrize(("field", "value", "valid"), DP_BAD)
def test_bad_dp_value_exits_2_with_one_error_line(
    field: str, value: str, valid: str, tmp_path: Any, capsys: Any, monkeypatch: Any
) -> None:

    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "out"
    argv = tiny_argv(out, "--config.dp.enabled=True", f"--config.{field}={value}")
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"config.{field} " in errors[0] and valid in errors[0]


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
    assert "epsilon" in capsys.readouterr().out  # the table's column
