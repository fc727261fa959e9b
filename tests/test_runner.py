"""Tests for the experiment runner: CLI overrides, bad input, an end-to-end tiny run, Ctrl-C."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from experiments import registry, report, run, runner
from experiments.configs import base

SMOKE = str(Path(run.__file__).parent / "configs" / "smoke.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_argv(out: Path, *extra: str, algorithms: str = "fedavg,fedbn") -> list[str]:
    """The smoke config on one setting: a few seconds per run."""
    return [
        "run",
        f"--config={SMOKE}",
        f"--config.out_dir={out}",
        "--config.settings=digits_feature_shift",
        f"--config.algorithms={algorithms}",
        "--config.compilation_cache=",  # no process-wide jax cache from a test
        *extra,
    ]


def test_no_flags_gives_the_embedded_default() -> None:
    assert run.parse_config(["run"]).to_dict() == base.get_config().to_dict()


def test_command_line_overrides_reach_the_config() -> None:
    config = run.parse_config(
        [
            "run",
            f"--config={SMOKE}",
            "--config.rounds=7",
            "--config.seeds=0,1,2",
            "--config.algorithms=fedprox,fedbn_prox",
            "--config.mu=0.01",
            "--config.data.alpha=0.1",
            "--config.model.widths=(8,16)",
            "--config.out_dir=/tmp/somewhere",
        ]
    )
    assert config.name == "smoke"  # from the chosen file
    assert (config.rounds, config.mu, config.data.alpha) == (7, 0.01, 0.1)
    assert tuple(config.seeds) == (0, 1, 2)
    assert tuple(config.model.widths) == (8, 16)
    assert config.out_dir == "/tmp/somewhere"
    resolved = runner.validate(config)
    assert resolved.algorithms == ("fedprox", "fedbn_prox")


def test_unknown_config_field_lists_valid_fields() -> None:
    with pytest.raises(registry.ConfigError, match=r"'roundz' \(did you mean 'rounds'\?\)") as e:
        run.parse_config(["run", "--config.roundz=3"])
    assert "valid fields:" in str(e.value) and "data.alpha" in str(e.value)


def test_bad_value_is_a_clear_error() -> None:
    with pytest.raises(registry.ConfigError, match="rounds"):
        run.parse_config(["run", "--config.rounds=many"])


@pytest.mark.parametrize(
    ("field", "value", "kind", "valid"),
    [
        ("algorithms", "fedavg,fedsgd", "algorithm", "fedprox_bn_eval"),
        ("settings", "digits_rotated", "setting", "digits_feature_shift"),
        ("model.name", "resnet", "model", "seed_cnn"),
        ("optim.name", "lamb", "optimizer", "adam"),
        ("executor", "threads", "executor", "sequential"),
    ],
)
def test_unknown_name_lists_valid_names(field, value, kind, valid, tmp_path, capsys) -> None:
    argv = ["run", f"--config={SMOKE}", f"--config.{field}={value}", f"--config.out_dir={tmp_path}"]
    with pytest.raises(registry.ConfigError, match=f"Unknown {kind}.*valid {kind}s:.*{valid}"):
        runner.validate(run.parse_config(argv))
    assert run.main(argv) == 2  # the CLI prints the error, no traceback, and trains nothing
    assert f"Unknown {kind}" in capsys.readouterr().err
    assert not (tmp_path / "history").exists()


def test_unwritable_out_dir_fails_before_training(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(registry.ConfigError, match="Cannot write to output directory"):
        runner.run_experiment(run.parse_config(tiny_argv(blocker / "out")))


def test_tiny_run_writes_every_promised_file(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert run.main(tiny_argv(out, "--config.rounds=2", "--config.eval_every=2")) == 0
    stdout = capsys.readouterr().out
    assert str(out) in stdout and "digits_feature_shift" in stdout and "client acc" in stdout

    config = json.loads((out / "config.json").read_text())
    assert config["rounds"] == 2 and config["out_dir"] == str(out)

    for alg in ("fedavg", "fedbn"):
        rows = report.read_history(report.history_path(out, "digits_feature_shift", alg, 0))
        assert [r["round"] for r in rows] == [1, 2]
        for r in rows:
            assert math.isfinite(r["train_loss"]) and r["bn_div"] > 0 and r["probe_div"] > 0
            assert r["client_acc"] is not None and r["seconds"] > 0
            assert r["bn_div_layers"] and r["bn_div_source"] in ("round", "local", "probe")
        assert (rows[-1]["global_acc"] is None) == (alg == "fedbn")  # fedbn has no global model
        assert (rows[-1]["affine_div"] is not None) == (alg == "fedbn")

    summary = json.loads((out / "summary.json").read_text())
    final = summary["results"]["digits_feature_shift"]
    assert set(final) == {"fedavg", "fedbn"}
    assert final["fedavg"]["client_acc"]["values"] and final["fedbn"]["global_acc"]["mean"] is None

    for name in ("accuracy", "bn_divergence"):
        png = out / "plots" / f"{name}_digits_feature_shift.png"
        assert png.read_bytes()[:8] == PNG_MAGIC


def test_ctrl_c_keeps_the_history_and_says_where(tmp_path, monkeypatch, capsys) -> None:
    real_make_round = runner.fb.make_round

    def interrupted_at_round_2(*args, **kwargs):
        round_fn, calls = real_make_round(*args, **kwargs), []

        def wrapped(state, train, key):
            calls.append(None)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return round_fn(state, train, key)

        return wrapped

    monkeypatch.setattr(runner.fb, "make_round", interrupted_at_round_2)
    out = tmp_path / "out"
    argv = tiny_argv(out, "--config.rounds=5", algorithms="fedbn")
    assert run.main(argv) == 130
    rows = report.read_history(report.history_path(out, "digits_feature_shift", "fedbn", 0))
    assert [r["round"] for r in rows] == [1]
    assert f"history so far is in {out / 'history'}" in capsys.readouterr().err


def test_table_shows_mean_and_std_over_seeds() -> None:
    runs = [
        {
            "setting": "s",
            "algorithm": "fedbn",
            "seed": seed,
            "global_acc": None,
            "client_acc": acc,
            "train_loss": 0.5,
            "bn_div": 0.01,
            "probe_div": 0.01,
            "affine_div": None,
            "sec_per_round": 0.1,
            "bn_div_source": "local",
        }
        for seed, acc in ((0, 0.8), (1, 0.9))
    ]
    per_alg = report.aggregate(runs)["s"]
    assert per_alg["fedbn"]["client_acc"]["mean"] == pytest.approx(0.85)
    table = report.format_table("s", per_alg)
    assert "2 seeds" in table and "0.850 ± 0.050" in table and "n/a" in table


def test_history_rows_are_strict_json(tmp_path) -> None:
    writer = report.HistoryWriter(tmp_path / "h.jsonl")
    writer.write({"round": 1, "x": float("nan"), "layers": {"a": float("inf")}})
    writer.close()
    assert report.read_history(tmp_path / "h.jsonl") == [
        {"round": 1, "x": None, "layers": {"a": None}}
    ]


def test_report_rebuilds_from_history_and_marks_incomplete_runs(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert run.main(tiny_argv(out, "--config.rounds=2", "--config.eval_every=2")) == 0
    cut = report.history_path(out, "digits_feature_shift", "fedbn", 0)
    cut.write_text(cut.read_text().splitlines()[0] + "\n")  # as if stopped after round 1
    (out / "summary.json").unlink()
    rebuilt = tmp_path / "rebuilt"
    assert report.main([str(out), "--out", str(rebuilt)]) == 0
    stdout = capsys.readouterr().out
    assert (
        "fedbn seed=0: 1 rounds, INCOMPLETE" in stdout
        and "fedavg seed=0: 2 rounds, complete" in stdout
    )
    runs = json.loads((rebuilt / "summary.json").read_text())["runs"]
    assert {(r["algorithm"], r["rounds"], r["complete"]) for r in runs} == {
        ("fedavg", 2, True),
        ("fedbn", 1, False),
    }
    assert (rebuilt / "plots" / "accuracy_digits_feature_shift.png").read_bytes()[:8] == PNG_MAGIC
    assert report.main([str(tmp_path / "nothing")]) == 2
