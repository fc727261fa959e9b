"""The runner's hyperparameter grid (``--config.sweep.*``): every point its own run, all of
them trained with the programs the first point compiled; bad grids are one error line."""

from __future__ import annotations

import csv
import json

import jax
import pytest
from test_runner import tiny_argv

from experiments import checks, history, privacy, report, run, sweep, sweep_report, train
from experiments.configs import base

COMPILES: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, d, **_: (
        COMPILES.append(d) if event == "/jax/core/compile/backend_compile_duration" else None
    )
)


def test_base_config_declares_every_sweepable_field() -> None:
    fields = {k for k in checks.flat_fields(base.get_config()) if k.startswith("sweep.")}
    assert fields == {f"sweep.{f}" for f in sweep.SWEEPABLE}
    assert sweep.points(base.get_config()) == [{}]


def test_grid_points_are_the_product_in_config_order() -> None:
    config = base.get_config()
    config.sweep.optim.lr, config.sweep.mu = "1e-3,2e-3", "0.01, 0.1"
    assert sweep.points(config) == [
        {"optim.lr": 1e-3, "mu": 0.01},
        {"optim.lr": 1e-3, "mu": 0.1},
        {"optim.lr": 2e-3, "mu": 0.01},
        {"optim.lr": 2e-3, "mu": 0.1},
    ]
    assert sweep.label("s", {"optim.lr": 1e-3, "mu": 0.1}) == "s@optim.lr=0.001,mu=0.1"
    assert sweep.apply(config, {"optim.lr": 2e-3}).optim.lr == 2e-3


def test_sweep_runs_every_point_without_compiling_again(tmp_path, monkeypatch, capsys) -> None:
    compiled_per_run: list[int] = []
    train_run = train.train_run

    def counted(*args, **kw):
        before = len(COMPILES)
        rows = train_run(*args, **kw)
        compiled_per_run.append(len(COMPILES) - before)
        return rows

    monkeypatch.setattr(train, "train_run", counted)
    out = tmp_path / "out"
    argv = tiny_argv(
        out,
        "--config.rounds=2",
        "--config.sweep.optim.lr=1e-3,3e-3",
        "--config.sweep.mu=0.001,0.1",
        algorithms="fedprox",
    )
    assert run.main(argv) == 0
    stdout = capsys.readouterr().out
    labels = [
        f"digits_feature_shift@optim.lr={lr},mu={mu}"
        for lr in ("0.001", "0.003")
        for mu in ("0.001", "0.1")
    ]
    losses = []
    for label in labels:
        rows = history.read_history(history.history_path(out, label, "fedprox", 0))
        assert [r["round"] for r in rows] == [1, 2] and rows[0]["setting"] == label
        losses.append(rows[-1]["train_loss"])
        assert label in stdout  # one table per point
        assert (out / "plots" / f"accuracy_{label}.png").exists()  # one plot per point
    assert len(set(losses)) == len(labels)  # each point trained with its own values
    grid = stdout[stdout.index("digits_feature_shift sweep: final global accuracy") :]
    assert all(label.partition("@")[2] in grid for label in labels)  # one row per point
    assert compiled_per_run[0] > 0 and compiled_per_run[1:] == [0, 0, 0]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["results"]) == sorted(labels)
    with (out / "sweep_digits_feature_shift.csv").open() as f:  # the grid, to plot or diff
        grid_rows = list(csv.DictReader(f))
    assert [(r["optim.lr"], r["mu"]) for r in grid_rows] == [
        (lr, mu) for lr in ("0.001", "0.003") for mu in ("0.001", "0.1")
    ]
    for r, label in zip(grid_rows, labels, strict=True):
        want = summary["results"][label]["fedprox"]["train_loss"]["mean"]
        assert float(r["train_loss_mean"]) == pytest.approx(want)
    png = (out / "plots" / "sweep_digits_feature_shift.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--config.sweep.optim.lr=1e-3,fast",), "config.sweep.optim.lr must list numbers"),
        (("--config.sweep.optim.lr=1e-3,-1e-3",), "config.sweep: config.optim.lr must be"),
        (("--config.sweep.optim.lr=1e-3,1e-3",), "lists a value more than once"),
        (("--config.sweep.server_lr=0,1",), "config.sweep.server_lr must list numbers > 0"),
        (("--config.sweep.mu=0.01,0.1",), "fedavg cannot sweep config.sweep.mu"),
    ],
)
def test_bad_sweep_is_one_error_line(extra, message, tmp_path, capsys) -> None:
    assert run.main(tiny_argv(tmp_path / "out", *extra, algorithms="fedavg")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_grid_table_has_a_row_per_point_and_a_column_per_algorithm() -> None:
    def stat(v: float | None) -> dict:
        return {"mean": v, "std": None if v is None else 0.0, "values": [] if v is None else [v]}

    results = {
        "s@lr=0.1": {
            "fedavg": {"global_acc": stat(0.5), "client_acc": stat(0.4)},
            "fedbn": {"global_acc": stat(None), "client_acc": stat(0.7)},
        },
        "s@lr=0.2": {"fedavg": {"global_acc": stat(0.25), "client_acc": stat(0.2)}},
        "plain": {"fedavg": {"global_acc": stat(0.9), "client_acc": stat(0.9)}},
    }
    (table,) = report.format_grids(results)  # the unswept setting makes none
    lines = table.splitlines()
    assert lines[2].split() == ["grid", "point", "fedavg", "fedbn"]
    assert lines[3].split() == ["lr=0.1", "0.500", "0.700", "(c)"]
    assert lines[4].split() == ["lr=0.2", "0.250", "n/a"]


def test_grid_rows_parse_each_point_and_fall_back_to_client_accuracy(tmp_path) -> None:
    def stat(v: float | None) -> dict:
        return {"mean": v, "std": None if v is None else 0.0, "values": [] if v is None else [v]}

    def stats(glob: float | None, client: float, seeds: int = 1) -> dict:
        acc = {"global_acc": stat(glob), "client_acc": stat(client)}
        return acc | {"train_loss": stat(1.0), "seeds": list(range(seeds))}

    results = {
        "s@lr=0.1,mu=0.01": {"fedbn": stats(None, 0.7, seeds=2)},
        "s@lr=1,mu=0.01": {"fedbn": stats(None, 0.6, seeds=2)},
        "plain": {"fedbn": stats(None, 0.9)},
    }
    (rows,) = sweep_report.grid_rows(results).values()
    assert [(r["lr"], r["mu"], r["seeds"]) for r in rows] == [(0.1, 0.01, 2), (1.0, 0.01, 2)]
    assert sweep_report.fields_of(rows) == ["lr", "mu"]
    assert sweep_report.accuracy_key(rows) == "client_acc"  # no global model in the grid
    paths = sweep_report.write_sweeps(tmp_path, results)
    assert [p.name for p in paths] == ["sweep_s.csv", "sweep_s.png"]


def test_dp_noise_points_get_their_own_epsilons() -> None:
    """A swept noise multiplier is the state's value and the accountant's: more noise, less
    epsilon; the build's own epsilons are not reused."""
    config = base.get_config()
    config.dp.enabled, config.rounds = True, 3
    built = train.Run(None, None, None, None, None, 0, None, epsilons=[0.0, 0.0, 0.0])
    low, high = (sweep.at_point(config, built, {"dp.noise_multiplier": z}) for z in (0.7, 2.0))
    assert low.hyper == {"dp.noise_multiplier": 0.7} and high.hyper == {"dp.noise_multiplier": 2.0}
    assert 0 < high.epsilons[-1] < low.epsilons[-1]
    assert low.epsilons == privacy.epsilons(sweep.apply(config, {"dp.noise_multiplier": 0.7}), 3)
