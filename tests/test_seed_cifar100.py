"""The bug report's CIFAR-100 config: exact settings, and a shrunk 2-round run on mock data."""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds

from experiments import report, run
from experiments.configs import seed_cifar100

SEED = str(Path(run.__file__).parent / "configs" / "seed_cifar100.py")


def test_config_is_the_reported_setting() -> None:
    c = seed_cifar100.get_config()
    assert (c.data.name, c.data.num_clients, c.data.alpha) == ("cifar100", 10, 0.5)
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay) == ("adam", 5e-4, 1e-4)
    assert (c.rounds, c.mu, c.model.name) == (75, 1e-3, "seed_cnn")
    assert set(c.algorithms) == {"fedprox_bn_eval", "fedprox", "fedavg", "fedbn", "fedbn_prox"}
    assert (c.augment, c.loss) == ("cifar", "cross_entropy")  # standard CIFAR augmentation


def test_shrunk_seed_run_on_mock_cifar100(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [
        "run",
        f"--config={SEED}",
        f"--config.out_dir={out}",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.rounds=2",
        "--config.eval_every=1",
        "--config.algorithms=fedprox_bn_eval,fedbn_prox",
        "--config.data.num_clients=3",
        "--config.data.min_size=2",
        "--config.model.widths=(4,)",
        "--config.model.hidden=8",
        "--config.monitor.probe_size=8",
        "--config.eval_batch_size=64",
        "--config.compilation_cache=",
    ]
    with tfds.testing.mock_data(num_examples=120):
        assert run.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]["tfds_label_skew"]) == {"fedprox_bn_eval", "fedbn_prox"}
    rows = report.read_history(report.history_path(out, "tfds_label_skew", "fedbn_prox", 0))
    assert [r["round"] for r in rows] == [1, 2]
    assert 0.0 <= rows[-1]["client_acc"] <= 1.0
