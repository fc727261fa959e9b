"""A given batch order (e.g. another framework's) replaces the round's own shuffle exactly."""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import pytest
from conftest import CounterModel, assert_trees_close, assert_trees_equal, make_clients, sgd

import fedjax_bn as fb
from fedjax_bn.execution import batches_from_order, round_batches, steps_per_epoch

SIZES, B, EPOCHS = (5, 8, 3), 4, 2
N_MAX = max(SIZES)


@functools.cache
def setup(executor: str) -> tuple[Any, Any]:
    alg = fb.fedbn(CounterModel(), sgd())
    return alg, fb.make_round(alg, executor=executor, batch_size=B, local_epochs=EPOCHS)


def orders_of(idx: Any, mask: Any) -> list[list[np.ndarray]]:
    """The per-client, per-epoch visiting order that ``(idx, mask)`` encodes."""
    spe = steps_per_epoch(N_MAX, B)
    idx, mask = np.asarray(idx), np.asarray(mask)
    return [
        [idx[c, e * spe : (e + 1) * spe][mask[c, e * spe : (e + 1) * spe]] for e in range(EPOCHS)]
        for c in range(len(SIZES))
    ]


@pytest.mark.parametrize("executor", ["sequential", "vmap"])
def test_the_rounds_own_order_given_back_is_the_same_round(executor: str) -> None:
    alg, rnd = setup(executor)
    data, key = make_clients(3, SIZES), jax.random.key(3)
    state = alg.init(jax.random.key(0), data.x[0, :1], len(SIZES))
    orders = orders_of(*round_batches(key, data.n, N_MAX, B, EPOCHS))
    assert [len(o[0]) for o in orders] == list(SIZES)
    given = rnd(state, data, jax.random.key(99), batches_from_order(orders, N_MAX, B))
    assert_trees_equal(given, rnd(state, data, key))


def test_another_order_is_followed_by_every_executor() -> None:
    data = make_clients(4, SIZES)
    orders = [[np.arange(n)[::-1], np.arange(n)] for n in SIZES]  # reversed, then in order
    batches = batches_from_order(orders, N_MAX, B)
    out = {}
    for ex in ("sequential", "vmap"):
        alg, rnd = setup(ex)
        state = alg.init(jax.random.key(0), data.x[0, :1], len(SIZES))
        out[ex] = rnd(state, data, jax.random.key(0), batches)
    assert_trees_close(out["sequential"], out["vmap"], rtol=1e-5, atol=1e-6)
    alg, rnd = setup("sequential")
    state = alg.init(jax.random.key(0), data.x[0, :1], len(SIZES))
    shuffled, _ = rnd(state, data, jax.random.key(0))
    diff = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(shuffled.server),
            jax.tree.leaves(out["sequential"][0].server),
            strict=True,
        )
    ]
    assert max(diff) > 0  # the order matters, so the given one was used


def test_bad_orders_and_shapes_are_refused() -> None:
    alg, rnd = setup("sequential")
    data = make_clients(5, SIZES)
    state = alg.init(jax.random.key(0), data.x[0, :1], len(SIZES))
    with pytest.raises(ValueError, match="n_c indices"):
        batches_from_order([[np.array([0, 9])], [np.arange(8)], [np.arange(3)]], N_MAX, B)
    with pytest.raises(ValueError, match="same number"):
        batches_from_order([[np.arange(5)], [np.arange(8), np.arange(8)]], N_MAX, B)
    one_epoch = batches_from_order([[np.arange(n)] for n in SIZES], N_MAX, B)
    with pytest.raises(ValueError, match="given batches have shape"):
        rnd(state, data, jax.random.key(0), one_epoch)
