"""Flower test harness: the simulation engine without Ray (:class:`ThreadBackend`), and a
SuperLink with SuperNodes on 127.0.0.1 (insecure) as subprocesses for ``flwr run``, every
process started stopped by its id. Used by ``tests/test_flower*.py``."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

from flwr.app import Context, Message
from flwr.server.superlink.fleet.vce.backend import Backend

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    """``n`` free TCP ports on 127.0.0.1."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def binaries_missing() -> list[str]:
    """The Flower executables this needs that are not installed next to this Python."""
    names = ("flower-superlink", "flower-supernode", "flwr")
    return [n for n in names if not (BIN / n).exists() and shutil.which(n) is None]


def exe(name: str, bindir: Path = BIN) -> str:
    """The executable ``name`` in ``bindir`` (default: next to this Python), else on PATH."""
    return str(bindir / name) if (bindir / name).exists() else str(shutil.which(name))


def wait_for_port(port: int, procs: list[subprocess.Popen], timeout: float) -> None:
    """Until something listens on 127.0.0.1:``port``; raise if a process died or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a Flower process exited early; see its log in FLWR_HOME.")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s.")


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process group started here (by id), then SIGKILL what is left."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@contextlib.contextmanager
def federation(
    home: Path,
    num_nodes: int,
    env: dict[str, str],
    bindir: Path = BIN,
    node_configs: list[str] | None = None,
) -> Iterator[dict[str, str]]:
    """A SuperLink and ``num_nodes`` SuperNodes (node config ``node_configs[i]``, default
    partition ``i`` of ``num_nodes``), Flower's executables from ``bindir`` (first on the
    PATH, where a SuperNode finds ``flwr-clientapp``); yields the environment under which
    ``flwr run`` reaches them (its ``FLWR_HOME`` names the link)."""
    link, *node_ports = free_ports(1 + num_nodes)  # the SuperLink's one HTTP port (all APIs)
    path = os.pathsep.join([str(bindir), env.get("PATH", "")])
    env = {**env, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "PATH": path}
    configs = node_configs or [
        f"partition-id={i} num-partitions={num_nodes}" for i in range(num_nodes)
    ]
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    procs: list[subprocess.Popen] = []

    def start(args: list[str], log: str) -> None:
        out = open(home / log, "w")  # noqa: SIM115 - closed when the process ends
        procs.append(
            subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                cwd=home,
            )
        )

    try:
        start(
            [
                exe("flower-superlink", bindir),
                "--insecure",
                "--port",
                str(link),
                "--database",
                ":flwr-in-memory:",
                "--disable-runtime-dependency-installation",
            ],
            "superlink.log",
        )
        wait_for_port(link, procs, 60)
        for i, (port, config) in enumerate(zip(node_ports, configs, strict=True)):
            start(
                [
                    exe("flower-supernode", bindir),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link}",
                    "--port",
                    str(port),
                    "--node-config",
                    config,
                ],
                f"supernode{i}.log",
            )
        yield env
    finally:
        stop(procs)


def flwr_run(
    app: Path, env: dict[str, str], config: str, timeout: float, bindir: Path = BIN
) -> str:
    """``flwr run APP --stream`` with ``--run-config config``; returns its output."""
    out = subprocess.run(
        [exe("flwr", bindir), "run", str(app), "--run-config", config, "--stream"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        start_new_session=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"flwr run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out.stdout + out.stderr


class ThreadBackend(Backend):
    """Flower's simulation backend without Ray: one worker running the ClientApp in-process."""

    seen: dict[int, tuple[Context, Message]] = {}  # partition id -> its last context, reply

    def __init__(self, backend_config) -> None:
        self.app_fn = None

    def build(self, app_fn) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context):
        # A copy, as Ray's serialization gives each actor: a workflow may send one content
        # object to every node (SecAgg+ does), and a mod may change what it receives.
        reply = self.app_fn()(message=copy.deepcopy(message), context=context)
        ThreadBackend.seen[int(context.node_config["partition-id"])] = (context, reply)
        return reply, context


def without_ray(monkeypatch) -> None:
    """Route the engine's backend import to :class:`ThreadBackend`; no telemetry."""
    module = types.ModuleType("raybackend")
    module.RayBackend = ThreadBackend
    monkeypatch.setitem(sys.modules, "flwr.server.superlink.fleet.vce.backend.raybackend", module)
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
