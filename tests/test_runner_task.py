"""The runner's task options: ResNet-18, training augmentation, label smoothing, their errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_runner import SMOKE, tiny_argv

from experiments import registry, report, run, runner


def argv(out: Path, *extra: str) -> list[str]:
    """The smoke config, one setting, one algorithm: seconds per run."""
    return tiny_argv(out, *extra, algorithms="fedavg")


def test_resnet18_with_augmentation_and_label_smoothing_runs(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    extra = (
        "--config.model.name=resnet18",
        "--config.model.num_filters=4",
        "--config.augment=cifar",  # 8x8x1 digits: the crop works on any HxW
        "--config.loss=label_smoothing",
        "--config.rounds=2",
        "--config.data.num_clients=2",
        "--config.batch_size=1024",  # one (masked) step per client: one train program compiles
        "--config.monitor.probe_size=8",
    )
    assert run.main(argv(out, *extra)) == 0
    assert "global acc" in capsys.readouterr().out
    rows = report.read_history(report.history_path(out, "digits_feature_shift", "fedavg", 0))
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["train_loss"]) and 0.0 <= r["train_acc"] <= 1.0
        assert r["global_acc"] is not None and r["client_acc"] is not None
        assert not [
            k for k in r if k.startswith(("train_", "global_")) and k not in report.BUILTIN_COLUMNS
        ]  # only accuracy: no extra metric columns
    config = json.loads((out / "config.json").read_text())
    assert (config["augment"], config["loss"], config["model"]["name"]) == (
        "cifar",
        "label_smoothing",
        "resnet18",
    )


def test_metrics_beyond_accuracy_get_train_and_global_columns(tmp_path, monkeypatch) -> None:
    import jax.numpy as jnp

    def error(logits, y):
        return (jnp.argmax(logits, -1) != y).astype(jnp.float32)

    metrics = {"accuracy": registry.fb.task.accuracy, "error": error}
    monkeypatch.setitem(registry.LOSSES, "cross_entropy", lambda c: {"metrics": metrics})
    out = tmp_path / "out"
    extra = ("--config.rounds=3", "--config.eval_every=3", "--config.data.num_clients=2")
    assert run.main(argv(out, *extra)) == 0
    rows = report.read_history(report.history_path(out, "digits_feature_shift", "fedavg", 0))
    assert rows[0]["train_error"] == pytest.approx(1 - rows[0]["train_acc"], abs=1e-5)
    assert rows[0]["global_error"] == pytest.approx(1 - rows[0]["global_acc"], abs=1e-5)
    assert rows[1]["global_error"] is None and rows[1]["train_error"] is not None  # no eval
    assert rows[2]["global_error"] is not None
    summary = json.loads((out / "summary.json").read_text())
    final = summary["results"]["digits_feature_shift"]["fedavg"]
    assert final["global_error"]["values"] and final["train_error"]["values"]
    table = report.format_table("digits_feature_shift", summary["results"]["digits_feature_shift"])
    assert "global error" in table.splitlines()[2] and "train error" in table.splitlines()[2]
    assert (out / "plots" / "metrics_digits_feature_shift.png").stat().st_size > 0


def test_label_smoothing_keeps_accuracy_and_smooths_the_target() -> None:
    import jax.numpy as jnp
    import optax

    config = run.parse_config(["run", f"--config={SMOKE}", "--config.loss=label_smoothing"])
    kw = registry._common(config)
    assert set(kw["metrics"]) == {"accuracy"}
    logits = jnp.array([[2.0, 0.0, -1.0]])
    want = optax.softmax_cross_entropy(logits, jnp.array([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]]))
    assert jnp.allclose(kw["loss"](logits, jnp.array([0])), want)
    assert kw["loss"] is registry._common(config)["loss"]  # one function: programs are shared
    assert registry._common(run.parse_config(["run", f"--config={SMOKE}"])) == {}


def test_norm_switching_algorithm_rejects_a_model_without_norm(tmp_path, capsys) -> None:
    extra = ("--config.model.name=resnet18", "--config.algorithms=fedavg_group")
    assert run.main(argv(tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    assert "ResNet has no `norm` field" in err and "digit_model, seed_cnn" in err


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("augment", "mixup", "Unknown augment 'mixup'; valid augments: cifar, crop, flip."),
        ("loss", "focal", "valid loss functions: cross_entropy, label_smoothing."),
        ("label_smoothing", "1", "config.label_smoothing must be a finite number in [0, 1)"),
        ("label_smoothing", "-0.1", "config.label_smoothing must be a finite number in [0, 1)"),
        ("model.num_filters", "0", "config.model.num_filters must be an integer >= 1"),
    ],
)
def test_bad_task_option_exits_2_with_one_error_line(
    field, value, valid, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained"))
    out = tmp_path / "out"
    assert run.main(argv(out, f"--config.{field}={value}")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert valid in errors[0]
    assert not out.exists()


def test_nnx_model_runs_and_evaluates(tmp_path, capsys) -> None:
    """The runner trains and evaluates a Flax NNX model (BN + dropout) under fedbn."""
    extra = ("--config.model.name=nnx_cnn", "--config.model.widths=8", "--config.algorithms=fedbn")
    out = tmp_path / "out"
    assert run.main(argv(out, *extra, "--config.rounds=2")) == 0
    rows = [json.loads(line) for p in (out / "history").glob("*.jsonl") for line in p.open()]
    assert rows and all(math.isfinite(r["train_loss"]) for r in rows)
    assert rows[-1]["client_acc"] is not None
