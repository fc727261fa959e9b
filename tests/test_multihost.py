"""The sharded executor over two processes (the multi-host path), on localhost's CPU.

Two processes of ``benchmarks/multihost.py`` join one ``jax.distributed`` runtime (a local
coordinator, gloo CPU collectives), each holding half of the population's clients and client
state, and run sampled cohort rounds; one process with two CPU devices runs the same rounds
alone. Both processes must end with the same state, and that state must equal the
one-process run's: server, every client's state, the sampled cohorts.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_trees_close, assert_trees_equal

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 240
ROUNDS, CLIENTS, COHORT = 3, 8, 4
PER_PROCESS = ("local_clients",)  # what differs between the processes by design


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    """The test's environment, minus forced CPU device counts (each process sets its own)."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "xla_force_host_platform_device_count" not in f)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def command(out: Path, *extra: str) -> list[str]:
    """``python -m benchmarks.multihost`` with the test's tiny run."""
    return [
        sys.executable,
        "-m",
        "benchmarks.multihost",
        "--cpu",
        f"--out={out}",
        f"--rounds={ROUNDS}",
        f"--clients={CLIENTS}",
        f"--cohort={COHORT}",
        *extra,
    ]


def run_all(commands: dict[str, list[str]], logs: Path) -> None:
    """Start every command at once and wait for all; on a failure or the timeout, stop the
    rest (a lone process would wait for its peer) and fail with their logs."""
    procs = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for name, cmd in commands.items():
            log = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed below)
            procs[name] = (
                subprocess.Popen(cmd, env=child_env(), cwd=ROOT, stdout=log, stderr=log),
                log,
            )
        while True:
            codes = [p.poll() for p, _ in procs.values()]  # poll each: no short-circuit
            done, failed = None not in codes, any(c not in (None, 0) for c in codes)
            if done or failed or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        for p, log in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
            log.close()
    bad = {n: p.returncode for n, (p, _) in procs.items() if p.returncode != 0}
    if bad:
        tails = "\n".join(
            f"--- {n} (rc {rc}):\n{(logs / f'{n}.log').read_text()[-3000:]}"
            for n, rc in bad.items()
        )
        pytest.fail(f"processes failed or ran past {TIMEOUT_S} s: {bad}\n{tails}")


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def shared(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Everything but the per-process fields."""
    return {k: v for k, v in out.items() if k not in PER_PROCESS}


def test_two_processes_equal_one_process(tmp_path: Path) -> None:
    coordinator = f"127.0.0.1:{free_port()}"
    two, one = tmp_path / "two", tmp_path / "one"
    dist = [f"--coordinator={coordinator}", "--num_processes=2", "--timeout=120"]
    run_all(
        {
            "process0": command(two, *dist, "--process_id=0"),
            "process1": command(two, *dist, "--process_id=1"),
            "single": command(one, "--num_processes=1", "--local_devices=2"),
        },
        tmp_path,
    )
    p0, p1, ref = load(two / "process0.npz"), load(two / "process1.npz"), load(one / "process0.npz")

    assert int(p0["devices"]) == int(ref["devices"]) == 2
    assert int(p0["local_clients"]) == int(p1["local_clients"]) == CLIENTS // 2
    assert int(ref["local_clients"]) == CLIENTS
    assert int(p0["round"]) == ROUNDS
    assert p0["cohorts"].shape == (ROUNDS, COHORT)
    assert len({tuple(c) for c in p0["cohorts"]}) > 1, "the cohort never changed"
    server = [k for k in p0 if k.startswith("server")]
    assert server and any(not np.array_equal(p0[k], p0[f"init_{k}"]) for k in server), (
        "the rounds left the server state as it was"
    )

    assert_trees_equal(shared(p0), shared(p1))  # one replicated server, one gathered population
    assert_trees_close(shared(p0), shared(ref))
