"""Tests for the experiment runner: CLI overrides, bad input, an end-to-end tiny run, Ctrl-C."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import numpy as np
import pytest

from experiments import checks, plots, registry, report, run, runner
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
    resolved = checks.validate(config)
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
        checks.validate(run.parse_config(argv))
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
        accs = rows[-1]["client_accs"]  # each client's own accuracy; client_acc is their mean
        assert len(accs) == 4 and np.mean(list(accs.values())) == pytest.approx(
            rows[-1]["client_acc"]
        )
        assert (rows[-1]["affine_div"] is not None) == (alg == "fedbn")

    summary = json.loads((out / "summary.json").read_text())
    final = summary["results"]["digits_feature_shift"]
    assert set(final) == {"fedavg", "fedbn"}
    assert final["fedavg"]["client_acc"]["values"] and final["fedbn"]["global_acc"]["mean"] is None

    for name in ("accuracy", "bn_divergence", "clients"):
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


BAD_VALUES = [
    ("seeds", "a", "non-negative integers"),
    ("seeds", "-1", "non-negative integers"),
    ("seeds", "1.5", "non-negative integers"),
    ("seeds", "0,0", "more than once"),
    ("optim.lr", "0", "> 0"),
    ("optim.lr", "-0.001", "> 0"),
    ("optim.lr", "nan", "finite number > 0"),
    ("optim.weight_decay", "-1e-4", ">= 0"),
    ("optim.momentum", "-0.9", ">= 0"),
    ("mu", "-0.01", ">= 0"),  # tiny_argv runs fedavg,fedbn: no prox algorithm selected
    ("server_lr", "-1", ">= 0"),
    ("eval_every", "0", "integer >= 1"),
    ("rounds", "0", "integer >= 1"),
    ("rounds", "-5", "integer >= 1"),
    ("batch_size", "0", "integer >= 1"),
    ("local_epochs", "0", "integer >= 1"),
    ("data.num_clients", "0", "integer >= 1"),
    ("data.alpha", "0", "> 0"),
    ("data.alpha", "-0.5", "> 0"),
    ("data.min_size", "-1", "integer >= 0"),
    ("monitor.probe_size", "0", "integer >= 1"),
    ("eval_batch_size", "0", "integer >= 1"),
    ("data.max_train", "-1", "integer >= 0"),
    ("data.max_test", "-1", "integer >= 0"),
    ("dp.noise_multiplier", "-1", ">= 0"),
    ("dp.clip_norm", "0", "> 0"),
    ("dp.q", "1.5", "[0, 1]"),
    ("dp.delta", "1", "[0, 1)"),
    ("dp.target_epsilon", "-2", ">= 0"),
]


@pytest.mark.parametrize(("field", "value", "valid"), BAD_VALUES)
def test_bad_value_exits_2_with_one_error_line(
    field, value, valid, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "out"
    assert run.main(tiny_argv(out, f"--config.{field}={value}")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert f"config.{field} " in errors[0] and valid in errors[0]
    assert not out.exists()


def test_every_bad_number_is_named_in_the_one_error() -> None:
    config = run.parse_config(["run", f"--config={SMOKE}", "--config.rounds=0", "--config.mu=-1"])
    with pytest.raises(registry.ConfigError, match=r"config\.rounds .*; config\.mu ") as e:
        checks.validate(config)
    assert "\n" not in str(e.value)


def test_bounds_name_real_fields() -> None:
    fields = checks.flat_fields(base.get_config())
    assert all(b.field in fields for b in checks.BOUNDS)


def test_cli_bad_seed_prints_one_line_and_no_traceback(tmp_path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    argv = tiny_argv(out, "--config.seeds=a")[1:]
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.run", *argv],
        capture_output=True,
        text=True,
        cwd=Path(run.__file__).parents[1],
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: config.seeds must be non-negative integers, e.g. --config.seeds=0,1,2; got 'a'."
    ]
    assert not out.exists()


def test_help_shows_the_config_docstring_meanings_values_and_valid_names(capsys) -> None:
    assert run.main(["run", f"--config={SMOKE}", "--help"]) == 0
    text = capsys.readouterr().out
    assert "A seconds-long smoke run: tiny model" in text  # smoke.py's docstring
    lines = {line.split()[0]: line for line in text.splitlines() if " = " in line}
    assert "= 2" in lines["rounds"] and "rounds per run" in lines["rounds"]  # smoke's value
    assert "= 0.5" in lines["data.alpha"] and "Dirichlet" in lines["data.alpha"]
    assert set(checks.flat_fields(run.parse_config(["run", f"--config={SMOKE}"]))) <= set(lines)
    assert "(no description)" not in text  # every field in base.py says what it means


def test_base_help_names_every_field_once_and_nothing_else() -> None:
    """base.HELP is the one place a field's meaning lives: exactly the fields get_config sets."""
    assert set(base.HELP) == set(checks.flat_fields(base.get_config()))
    assert all(base.HELP.values())


def test_a_config_files_help_notes_follow_the_base_meaning(capsys) -> None:
    """A study's HELP note on a field it sets is printed after base.py's meaning of it."""
    path = str(Path(SMOKE).parent / "bn_methods.py")
    assert run.main(["run", f"--config={path}", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "[bn_methods.py: half of the 40 rounds train as FedAvg, then BN is frozen]" in text
    for config in Path(SMOKE).parent.glob("*.py"):  # notes only on fields base.py defines
        assert set(runpy.run_path(str(config)).get("HELP", {})) <= set(base.HELP), config.name
    for names in (registry.ALGORITHMS, registry.SETTINGS, registry.MODELS, registry.OPTIMIZERS):
        assert all(name in text for name in names)


def _rows(alg: str, source: str, global_acc: bool) -> list[report.Row]:
    return [
        {
            "setting": "s",
            "algorithm": alg,
            "seed": seed,
            "round": rnd,
            "global_acc": 0.1 * rnd + 0.01 * seed if global_acc else None,
            "client_acc": 0.2 * rnd + 0.01 * seed,
            "bn_div": 0.01 * rnd,
            "bn_div_source": source,
            "probe_div": 0.01 * rnd,
            "affine_div": float("nan"),  # in-memory rows hold NaN where there is nothing
        }
        for seed in (0, 1)
        for rnd in (1, 2, 3)
    ]


def test_plot_legends_list_only_drawn_curves_with_their_sources() -> None:
    import matplotlib.pyplot as plt

    rows = {"fedavg": _rows("fedavg", "probe", True), "fedbn": _rows("fedbn", "local", False)}
    fig, axes = plt.subplots(1, 2)
    drawn = [plots._panel(ax, rows, p) for ax, p in zip(axes, plots.ACCURACY_PANELS, strict=True)]
    plots._share_y(axes, plots.ACCURACY_PANELS, drawn)
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["fedavg (mean ± std over 2 seeds)"]
    assert "no global model: fedbn" in axes[0].get_title()
    assert axes[0].get_ylim() == axes[1].get_ylim()  # both accuracies on one scale
    assert axes[0].get_xlabel() == "round" and axes[0].get_ylabel() == "accuracy"
    plt.close(fig)

    bn_div, _, affine = plots.DIVERGENCE_PANELS
    fig, (ax_bn, ax_affine) = plt.subplots(1, 2)
    plots._panel(ax_bn, rows, bn_div)
    assert [t.get_text().split(" (")[0] for t in ax_bn.get_legend().get_texts()] == [
        "fedavg [probe]",
        "fedbn [running]",
    ]
    assert not plots._panel(ax_affine, rows, affine) and ax_affine.get_legend() is None
    plt.close(fig)


def test_table_names_the_statistics_of_each_bn_divergence() -> None:
    runs = [
        report.run_summary(
            [{**r, "seconds": 0.1, "wall": 0.3} for r in _rows(a, s, g) if r["seed"] == 0]
        )
        for a, s, g in (("fedavg", "probe", True), ("fedbn", "local", False))
    ]
    table = report.format_table("s", report.aggregate(runs)["s"])
    fedavg, fedbn = (line for line in table.splitlines() if line.startswith("fed"))
    assert "[probe]" in fedavg and "[running]" in fedbn
    assert "[probe] = " in table and "[running] = " in table  # what the tags mean


def test_cohort_runs_name_each_rounds_cohort(tmp_path) -> None:
    out = tmp_path / "out"
    argv = tiny_argv(out, "--config.rounds=2", "--config.cohort_size=2", algorithms="fedbn")
    assert run.main(argv) == 0
    rows = report.read_history(report.history_path(out, "digits_feature_shift", "fedbn", 0))
    assert [len(r["cohort"]) for r in rows] == [2, 2]
    assert all(r["cohort"] == sorted(set(r["cohort"])) for r in rows)
    too_many = tiny_argv(tmp_path / "x", "--config.cohort_size=999")
    assert run.main(too_many) == 2


def test_client_figure_pools_each_seeds_last_client_accuracies(tmp_path) -> None:
    rows = _rows("fedavg", "probe", True)
    for r in rows:
        r["client_accs"] = {"0": 0.1 * r["round"], "1": 0.5 + r["seed"] * 0.1}
    assert plots.final_client_accs(rows) == {
        0: {0: pytest.approx(0.3), 1: 0.5},
        1: {0: pytest.approx(0.3), 1: 0.6},
    }
    path = plots._client_figure(
        tmp_path / "c.png", "s", {"fedavg": rows, "none": _rows("x", "probe", True)}
    )
    assert path is not None and path.read_bytes()[:8] == PNG_MAGIC
    assert plots._client_figure(tmp_path / "d.png", "s", {"x": _rows("x", "probe", True)}) is None
