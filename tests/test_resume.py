"""Kill a run with SIGKILL mid-way, resume it, and get the uninterrupted run bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest

from experiments import registry, run, runner, train
from fedjax_bn.checkpoint import Checkpointer

ROUNDS = 7
ARGS = [
    "--config.settings=digits_label_skew",
    "--config.algorithms=fedbn",
    "--config.seeds=0",
    f"--config.rounds={ROUNDS}",
    "--config.eval_every=2",
    "--config.checkpoint_every=2",
    "--config.model.widths=4",
    "--config.model.hidden=8",
    "--config.data.num_clients=3",
    "--config.progress=False",
    "--config.compilation_cache=",
]
HISTORY = "history/digits_label_skew__fedbn__seed0.jsonl"
TIMINGS = ("seconds", "wall")  # wall-clock fields differ between any two runs


def cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "experiments.run", *ARGS, f"--config.out_dir={out}", *extra]


def env() -> dict[str, str]:
    e = dict(os.environ, FEDJAX_BN_COMPILATION_CACHE="0")
    e["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), e.get("PYTHONPATH", "")])
    return e


def rows(out: Path) -> list[dict[str, Any]]:
    lines = (out / HISTORY).read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k not in TIMINGS} for x in lines]


def final_state(out: Path) -> Any:
    config = run.resume_config(str(out))
    data = registry.build_setting(config.settings[0], config, train.derive_seeds(0).data)
    alg = registry.build_algorithm(
        "fedbn",
        registry.build_model(config, data.num_classes),
        registry.build_optimizer(config),
        config,
    )
    like = alg.init(jax.random.key(0), data.train.x[0, :1], data.num_clients)
    ckpt = Checkpointer(train.checkpoint_dir(out, config.settings[0], "fedbn", 0))
    restored = ckpt.restore(like)
    ckpt.close()
    return restored


def test_sigkill_then_resume_is_bit_identical(tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    subprocess.run(cli(whole), env=env(), check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(cli(cut), env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    history, deadline = cut / HISTORY, time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGKILL)  # after round 3: the last checkpoint is round 2
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert len(rows(cut)) < ROUNDS
    resumed = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"--resume={cut}"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert rows(cut) == rows(whole) and len(rows(whole)) == ROUNDS
    a, b = final_state(whole), final_state(cut)
    assert a.round == b.round == ROUNDS
    np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_existing_results_are_refused_without_resume_or_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["run", *ARGS, "--config.rounds=1", f"--config.out_dir={out}"]
    assert run.main(argv) == 0
    before = (out / HISTORY).read_text()
    assert run.main(argv) == 2
    err = capsys.readouterr().err
    assert "already holds results" in err and "--resume" in err and "--overwrite" in err
    assert (out / HISTORY).read_text() == before  # nothing was touched
    assert run.main([*argv, "--overwrite"]) == 0
    assert run.main(["run", f"--resume={out}"]) == 0  # complete: nothing re-runs
    assert (out / HISTORY).read_text().count("\n") == 1
    assert run.main(["run", f"--resume={out}", "--config.rounds=3"]) == 2


def test_resume_fills_fields_added_since_and_refuses_unknown_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    saved = run.resume_config  # the function under test
    config = json.loads(json.dumps(run.parse_config(["run", *ARGS]).to_dict(), default=list))
    del config["clip_norm"]  # as if the run predates the field
    (out / "config.json").write_text(json.dumps(config))
    assert saved(str(out)).clip_norm == 0.0
    config["no_such_field"] = 1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(runner.ConfigError, match="no_such_field"):
        saved(str(out))
