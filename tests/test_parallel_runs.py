"""The runner's ``--config.parallel_runs=S``: seeds trained as one batched federation write the
same files and histories as the same seeds run one at a time.

Both use ``executor=vmap`` (batched runs vmap their clients whatever the executor; against
``sequential`` the executors' own float differences would be compared too, and a BN divergence,
a difference of near-equal statistics, magnifies those). Histories are compared with
``rtol=1e-3, atol=1e-5``: the batched program may reorder float reductions, and the BN
divergence columns magnify the last bits of the statistics (seen: 4e-4 relative on a divergence
of 0.04; the states themselves agree to 1e-5 in ``tests/test_vmap_runs.py``). Accuracy
columns may differ by ``ACC_ATOL`` (3 of the 360 test examples of a client): the tiny model is
near chance after two rounds, its logits nearly tied, and float reassociation can flip an
example's argmax (seen: one example). Counts, cohorts and round numbers must be equal;
wall-clock columns are not compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_clients
from test_runner import tiny_argv

from experiments import checks, parallel, registry, report, run

TIMES = {"seconds", "wall", "sec_per_round", "first_round_sec", "wall_sec"}
RTOL, ATOL = 1e-3, 1e-5
ACC_ATOL = 0.01  # accuracies: a few argmax flips of near-tied logits (module docstring)
CLIENT_ACC_ATOL = 3 / 90  # one client's accuracy (``client_accs``): 3 of its 90 test examples


def files(out: Path, under: str) -> list[str]:
    """Every file name directly under ``out/under`` (the run directories), sorted."""
    return sorted(str(p.relative_to(out / under)).split("/")[0] for p in (out / under).iterdir())


def assert_rows_close(got: dict, want: dict, accuracies: bool = False) -> None:
    """Rows (or a nested column such as ``client_accs``, whose values are accuracies when
    ``accuracies``) equal up to the module's tolerances."""
    assert set(got) == set(want)
    for key in set(want) - TIMES:
        a, b = got[key], want[key]
        if isinstance(b, dict):
            assert_rows_close(a, b, accuracies=key.endswith("_accs"))
        elif isinstance(b, float):
            atol = CLIENT_ACC_ATOL if accuracies else ACC_ATOL if key.endswith("_acc") else ATOL
            np.testing.assert_allclose(a, b, rtol=RTOL, atol=atol, err_msg=key)
        else:
            assert a == b, key


def test_parallel_runs_write_what_separate_runs_write(tmp_path: Path) -> None:
    outs = {}
    for s in (1, 2):
        outs[s] = tmp_path / f"p{s}"
        argv = tiny_argv(
            outs[s],
            "--config.seeds=0,1",
            f"--config.parallel_runs={s}",
            "--config.executor=vmap",
            "--config.progress=False",
        )
        assert run.main(argv) == 0
    alone, batched = outs[1], outs[2]
    for under in ("history", "checkpoints", "tensorboard"):
        assert files(batched, under) == files(alone, under), under
    for alg in ("fedavg", "fedbn"):
        for seed in (0, 1):
            path = report.history_path(alone, "digits_feature_shift", alg, seed)
            want = report.read_history(path)
            got = report.read_history(
                report.history_path(batched, "digits_feature_shift", alg, seed)
            )
            assert [r["round"] for r in got] == [1, 2]
            for g, w in zip(got, want, strict=True):
                assert_rows_close(g, w)
    want, got = (json.loads((out / "summary.json").read_text())["runs"] for out in outs.values())
    assert len(got) == len(want) == 4
    for g, w in zip(got, want, strict=True):  # the config's order: by seed, then algorithm
        assert_rows_close(g, w)


@pytest.mark.parametrize(
    "extra, match",
    [
        ("--config.parallel_runs=0", r"config\.parallel_runs must be an integer >= 1"),
        ("--config.cohort_size=2", r"does not support config\.cohort_size"),
        ("--config.budget_max_steps=2", r"config\.budget_max_steps"),
        ("--config.executor=sharded", r"config\.executor=sharded"),
    ],
)
def test_unsupported_combinations_are_refused(extra: str, match: str, tmp_path: Path) -> None:
    config = run.parse_config(tiny_argv(tmp_path, "--config.parallel_runs=2", extra))
    with pytest.raises(registry.ConfigError, match=match):
        checks.validate(config)


def test_only_runs_with_data_of_one_shape_are_batched(capsys) -> None:
    def fake(sizes: tuple[int, ...], n_max: int) -> SimpleNamespace:
        return SimpleNamespace(data=SimpleNamespace(train=make_clients(0, sizes, n_max=n_max)))

    keys = [("s", seed, "fedavg") for seed in range(5)]
    runs = dict(
        zip(
            keys,
            [fake((3, 4), 4), fake((4, 2), 4), fake((3, 5), 5), fake((1, 4), 4), fake((2, 2), 4)],
            strict=True,
        )
    )
    assert parallel.batches(keys, runs, 2) == [[keys[0], keys[1]], [keys[2]], [keys[3], keys[4]]]
    assert "partitions of different shapes" in capsys.readouterr().out
    assert parallel.batches(keys[:2], runs, 1) == [[keys[0]], [keys[1]]]


def test_sweep_points_batch_with_each_other(tmp_path: Path, monkeypatch) -> None:
    batched_keys = []
    real = parallel.train_batched

    def spy(config, runs, keys, out, *, resume):
        batched_keys.append(list(keys))
        return real(config, runs, keys, out, resume=resume)

    monkeypatch.setattr(parallel, "train_batched", spy)
    outs = {s: tmp_path / f"p{s}" for s in (1, 2)}
    for s, out in outs.items():
        argv = tiny_argv(
            out,
            "--config.sweep.optim.lr=1e-3,3e-3",
            f"--config.parallel_runs={s}",
            "--config.executor=vmap",
            "--config.progress=False",
            algorithms="fedavg",
        )
        assert run.main(argv) == 0
    labels = [f"digits_feature_shift@optim.lr={lr}" for lr in ("0.001", "0.003")]
    assert batched_keys == [[(label, 0, "fedavg") for label in labels]]  # one batch, both points
    for label in labels:
        want, got = (
            report.read_history(report.history_path(out, label, "fedavg", 0))
            for out in outs.values()
        )
        assert [r["round"] for r in got] == [1, 2]
        for g, w in zip(got, want, strict=True):
            assert_rows_close(g, w)
    lr_rows = [
        report.read_history(report.history_path(outs[2], label, "fedavg", 0))[-1]
        for label in labels
    ]
    assert lr_rows[0]["train_loss"] != lr_rows[1]["train_loss"]  # each point kept its own lr


def test_training_order_batches_the_points_of_a_setting() -> None:
    data = SimpleNamespace(train=make_clients(0, (3, 4), n_max=4))
    keys = [("s@lr=1", 0, "a"), ("s@lr=2", 0, "a"), ("s@lr=1", 1, "a"), ("t@lr=1", 0, "a")]
    keys.append(("s@lr=1", 0, "b"))
    runs = {key: SimpleNamespace(data=data) for key in keys}
    config = SimpleNamespace(parallel_runs=3)
    assert parallel.training_order(config, runs) == [keys[:3], [keys[3]], [keys[4]]]
