"""The device check (``benchmarks/device_check.sh``) runs end to end in tiny mode on the CPU and
writes the JSON the GPU runs are read from: four sections, a device name, positive round times
for every measured (not skipped) entry, finite losses."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"


def test_device_check_tiny(tmp_path: Path) -> None:
    env = dict(os.environ)
    env.update(
        OUT=str(tmp_path),
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "--xla_backend_optimization_level=0"),
        FEDJAX_BN_COMPILATION_CACHE="0",
        JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
        DEVICE_CHECK_PYTHON=sys.executable,  # the interpreter running the tests runs the check
    )
    env.pop("DEVICE_CHECK_T0", None)
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--tiny"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "device_check.json").read_text())

    assert report["complete"] is True
    assert report["mode"] == "tiny"
    for section in ("device", "throughput", "seed_cifar100", "parallel_runs"):
        assert section in report, section

    device = report["device"]
    assert isinstance(device["device_kind"], str) and device["device_kind"].strip()
    assert device["device_count"] >= 1
    assert device["backend"] and device["jax_version"]

    entries = report["throughput"]
    assert len(entries) == 2 * 2 * 3  # models x client counts x executors, skipped ones too
    measured = [e for e in entries if "skipped" not in e]
    assert measured, "every throughput entry was skipped"
    for e in entries:
        assert {"model", "clients", "executor"} <= set(e), e
        assert "error" not in e, e
        if "skipped" in e:
            assert isinstance(e["skipped"], str) and e["skipped"], e
            continue
        assert e["round_s"] > 0 and e["first_round_s"] > 0, e
        assert all(t > 0 for t in e["round_s_all"]), e
        assert e["examples_per_s"] > 0 and e["compile_s"] >= 0, e
        assert e["finite"] and all(math.isfinite(v) for v in e["loss_per_client"]), e
        assert e["model_config"] and e["batch_size"] == 32, e
    # The smallest cohort of each model runs first, so both models have a measurement.
    assert {e["model"] for e in measured} == {"SeedCNN", "ResNet18"}
    assert {e["executor"] for e in measured} == {"vmap", "sequential", "chunked"}
    chunked = [e for e in entries if e["executor"] == "chunked"]
    assert all(e["chunk_size"] for e in chunked)

    seed = report["seed_cifar100"]
    assert "skipped" not in seed and "error" not in seed, seed
    assert seed["config"]["mu"] == 1e-3 and seed["config"]["augment"] == "cifar_standard"
    assert len(seed["rounds"]) >= 2
    for r in seed["rounds"]:
        assert r["seconds"] > 0
        assert r["finite"] and math.isfinite(r["loss_mean"])
        assert all(math.isfinite(v) for v in r["loss_per_client"])
    assert seed["all_finite"] is True
    assert seed["round_s"] > 0

    runs = report["parallel_runs"]  # S = 1, 2 batched against the runs one by one
    assert "error" not in runs, runs
    if "skipped" in runs:  # the time budget was spent before it (a loaded machine)
        return
    programs = runs["programs"]
    assert {"separate/vmap", "batched/1", "batched/2"} <= set(programs), programs
    assert all(p["per_run_round_s"] > 0 and p["first_call_s"] > 0 for p in programs.values())
    assert programs["batched/2"]["speedup"]["vmap"] > 0


def test_parallel_runs_entry_on_a_tiny_workload(monkeypatch) -> None:
    """The device check's parallel-runs entry, in process (in the tiny check above the time
    budget may skip it): every program measured, per-run times and speedups positive."""
    monkeypatch.syspath_prepend(str(ROOT))  # benchmarks/ is a script folder, not installed
    from benchmarks import device_check

    cfg = dict(device_check.TINY["parallel_runs"], rounds=1)
    out = device_check.parallel_runs_entry(cfg, budget_s=float("inf"))
    assert "error" not in out and not out["skipped"], out
    programs = out["programs"]
    assert set(programs) == {"separate/vmap", "batched/1", "batched/2"}
    assert all(p["per_run_round_s"] > 0 and p["first_call_s"] > 0 for p in programs.values())
    assert programs["batched/2"]["speedup"]["vmap"] > 0
