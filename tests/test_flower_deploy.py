"""A real deployment: the example Flower App (``examples/flower_app``) run with ``flwr run`` on
a SuperLink and two SuperNodes started as separate processes on 127.0.0.1 (insecure), for 2
rounds; its final server state equals the Flower simulation of the same algorithm, data and
keys (bitwise). Every process is stopped by its id; each step is bounded in time."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flower_harness import binaries_missing, federation, flwr_run, without_ray  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from fedjax_bn.flower import client_app, server_app  # noqa: E402
from fedjax_bn.flower.records import leaf_paths  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
REPO = APP.parents[1]
CONFIG = {
    "algorithm": "fedbn_prox",
    "lr": 0.05,
    "num-server-rounds": 2,
    "examples-per-client": 40,
    "batch-size": 16,
}


def simulated(monkeypatch) -> dict[str, np.ndarray]:
    """The same app's algorithm, data and keys through Flower's simulation engine."""
    sys.path.insert(0, str(APP))
    try:
        from fedjax_bn_app.task import algorithm, load_data, sample_x
    finally:
        sys.path.remove(str(APP))
    without_ray(monkeypatch)
    alg, out = algorithm(CONFIG), {}
    capp = client_app(
        alg, lambda ctx: load_data(ctx.node_config, CONFIG), batch_size=CONFIG["batch-size"]
    )
    sapp = server_app(
        alg,
        sample_x(),
        num_clients=2,
        num_rounds=CONFIG["num-server-rounds"],
        seed=0,
        min_train_nodes=2,
        on_done=lambda server, _: out.update(server=server),
    )
    run_simulation(sapp, capp, num_supernodes=2, backend_name="thread")
    return {p: np.asarray(v) for p, v in leaf_paths(out["server"])}


@pytest.mark.skipif(
    bool(binaries_missing()), reason=f"Flower binaries missing: {binaries_missing()}"
)
def test_flwr_run_on_a_superlink_and_two_supernodes_matches_the_simulation(
    tmp_path, monkeypatch
) -> None:
    result = tmp_path / "final.npz"
    config = " ".join(
        f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in CONFIG.items()
    ).replace("'", '"')
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        # the App enables jax's persistent cache (compilation-cache = true): keep it here
        "FEDJAX_BN_COMPILATION_CACHE": str(tmp_path / "jax_cache"),
    }
    with federation(tmp_path / "flwr", 2, env) as run_env:
        log = flwr_run(APP, run_env, f'{config} result-path="{result}"', timeout=300)
    assert "round 2: clients [0, 1]" in log, log
    with np.load(result) as deployed:
        got = dict(deployed)
    want = simulated(monkeypatch)
    assert got.keys() == want.keys() and want
    for path, value in want.items():
        assert got[path].dtype == value.dtype, path
        np.testing.assert_array_equal(got[path], value, err_msg=path)
