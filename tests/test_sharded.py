"""Tests for the sharded executor (fedjax_bn.execution.sharded): its plans pad each group to
the device count, and on 8 forced CPU devices (a subprocess: XLA_FLAGS must be set before jax
starts) it equals vmap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from fedjax_bn.execution.plan import make_plan

sizes_st = st.lists(st.integers(1, 40), min_size=1, max_size=12)


@given(sizes=sizes_st, devices=st.integers(1, 8))
def test_sharded_plan_pads_each_group_to_the_device_count(sizes: list[int], devices: int) -> None:
    plan = make_plan(sizes, 4, 1, max(sizes), multiple=devices)
    for g in plan.groups:
        assert len(g.clients or sizes) % devices == 0


SHARDED_SCRIPT = textwrap.dedent(
    """
    import jax, numpy as np, optax
    assert jax.device_count() == 8, jax.devices()
    from conftest import assert_trees_close, make_clients, tiny_cnn
    import fedjax_bn as fb
    from fedjax_bn.execution import make_round
    from fedjax_bn.execution.sharded import client_mesh, place

    alg = fb.fedbn_prox(tiny_cnn(), optax.sgd(0.05, momentum=0.9), mu=0.1,
                        persist_client_optimizer=True)
    for sizes in [(5, 13, 9), (5, 13, 9, 2, 8, 8, 1, 11)]:  # padded to 8 clients; even split
        data = make_clients(1, sizes)
        state = alg.init(jax.random.key(0), data.x[0, :1], len(sizes))
        out = {}
        for ex in ("vmap", "sharded"):
            s, d = state, data
            if ex == "sharded" and len(sizes) == 8:
                s, d = place(state, data, client_mesh())
            rnd = make_round(alg, executor=ex, batch_size=4, local_epochs=2, loop="scan")
            for r in range(2):
                s, res = rnd(s, d, jax.random.key(r))
            out[ex] = (s, res)
        assert_trees_close(out["sharded"], out["vmap"], rtol=1e-4, atol=1e-5)
        if len(sizes) == 8:
            leaf = jax.tree.leaves(out["sharded"][0].clients.local)[0]
            assert len(leaf.sharding.device_set) == 8, leaf.sharding
            assert leaf.addressable_shards[0].data.shape[0] == 1
    print("SHARDED OK")
    """
)


def test_sharded_on_eight_cpu_devices_equals_vmap() -> None:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    env["JAX_PLATFORMS"] = "cpu"
    tests = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(tests), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tests,
    )
    assert proc.returncode == 0 and "SHARDED OK" in proc.stdout, proc.stderr[-4000:]
