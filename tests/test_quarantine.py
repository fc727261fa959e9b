"""NaN/Inf quarantine and update clipping: one broken client cannot poison the federation."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CounterModel, assert_trees_close, assert_trees_equal, make_clients, sgd

import fedjax_bn as fb
from fedjax_bn.algorithms.fedavg import clip_updates
from fedjax_bn.policy import float_leaves

SIZES = (5, 8, 6)
B = 4
SAMPLE_X = make_clients(0, SIZES).x[0, :1]


@functools.cache
def setup(name: str, executor: str) -> tuple[Any, Any]:
    alg = {
        "fedavg": lambda: fb.fedavg(CounterModel(), sgd()),
        "fedbn": lambda: fb.fedbn(CounterModel(), sgd(), persist_client_optimizer=True),
    }[name]()
    return alg, fb.make_round(alg, executor=executor, batch_size=B)


def with_nan_pixel(data: Any, c: int) -> Any:
    return data.replace(x=data.x.at[c, 0, 0, 0, 0].set(jnp.nan))


def without_client(data: Any, c: int) -> Any:
    return data.replace(n=data.n.at[c].set(0))


@pytest.mark.parametrize("executor", ["sequential", "vmap"])
@pytest.mark.parametrize("name", ["fedavg", "fedbn"])
def test_one_nan_client_is_dropped_like_a_client_without_data(name: str, executor: str) -> None:
    """A NaN pixel on client 1: the new global model is finite and equals the round in which
    client 1 holds no data; client 1 keeps its state; the result names it."""
    alg, rnd = setup(name, executor)
    state = alg.init(jax.random.key(0), SAMPLE_X, len(SIZES))
    data, key = make_clients(1, SIZES), jax.random.key(1)
    bad, res = rnd(state, with_nan_pixel(data, 1), key)
    ref, ref_res = rnd(state, without_client(data, 1), key)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(bad.server))
    np.testing.assert_array_equal(res.quarantined, [False, True, False])
    assert not bool(jnp.any(ref_res.quarantined))
    # bitwise for sequential; the vmapped round may differ by float reassociation
    close = assert_trees_equal if executor == "sequential" else assert_trees_close
    close(bad.server, ref.server)
    assert_trees_equal(
        jax.tree.map(lambda a: a[1], bad.clients), jax.tree.map(lambda a: a[1], state.clients)
    )


def test_every_client_quarantined_keeps_the_server_state() -> None:
    alg, rnd = setup("fedavg", "sequential")
    state = alg.init(jax.random.key(0), SAMPLE_X, len(SIZES))
    data = make_clients(2, SIZES)
    data = data.replace(x=jnp.full_like(data.x, jnp.nan))
    new, res = rnd(state, data, jax.random.key(2))
    assert bool(jnp.all(res.quarantined))
    assert_trees_equal(new.server, state.server)
    assert int(new.round) == int(state.round) + 1


def test_clip_updates_bounds_each_clients_update_norm() -> None:
    server = {"params": {"w": jnp.zeros((2,)), "b": jnp.zeros(())}}
    shared_C = {"params": {"w": jnp.array([[3.0, 4.0], [0.3, 0.4]]), "b": jnp.array([0.0, 0.0])}}
    out = clip_updates(shared_C, server, 1.0)
    # client 0's update has norm 5 -> scaled to 1; client 1's (norm 0.5) is left alone
    np.testing.assert_allclose(out["params"]["w"], [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)
    assert set(float_leaves(out)) == set(float_leaves(server))
    with pytest.raises(ValueError, match="clip_norm"):
        fb.fedavg(CounterModel(), sgd(), clip_norm=0.0)
