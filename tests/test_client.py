"""Tests for fedjax_bn.client: BN mode while training, masking, the FedProx term, local loops."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    CounterModel,
    assert_trees_close,
    assert_trees_equal,
    make_clients,
    normal,
    randint,
    sgd,
    tiny_cnn,
)
from hypothesis import given
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn import client as client_lib
from fedjax_bn.client import LocalTraining
from fedjax_bn.execution import client_update
from fedjax_bn.policy import bn_param_mask, partition
from fedjax_bn.tree import Variables, flatten

MU = 0.5
B = 4
seeds = st.integers(0, 2**31 - 1)


@pytest.fixture(scope="module")
def variables(sample_x: jax.Array) -> Variables:
    """Real initial variables of the tiny CNN (BN mean 0, var 1)."""
    init = jax.jit(functools.partial(tiny_cnn().init, train=False))
    return dict(init(jax.random.key(0), sample_x))


@functools.cache
def jitted_step(bn_train: bool) -> Any:
    """One jitted ``train_step`` per BN mode, shared by every test in this module."""
    spec = LocalTraining(tiny_cnn(), sgd(), bn_train=bn_train)
    return spec, jax.jit(functools.partial(client_lib.train_step, spec))


def batch(seed: int, size: int) -> tuple[jax.Array, jax.Array]:
    """``size`` images with a non-zero mean (so BN statistics move) and their labels."""
    data = make_clients(seed, (size,))
    return data.x[0], data.y[0]


@given(seed=seeds)
def test_train_mode_updates_batch_stats_eval_mode_does_not(variables: Variables, seed: int) -> None:
    """bn_train=True moves every running statistic; bn_train=False (the bug) moves none."""
    x, y = batch(seed, B)
    mask = jnp.ones(B, bool)
    for bn_train in (True, False):
        spec, step = jitted_step(bn_train)
        state = client_lib.init_state(spec, variables)
        new = step({}, state, client_lib.Batch(x, y, mask))
        old_stats, new_stats = variables["batch_stats"], new.variables["batch_stats"]
        moved = jax.tree.leaves(
            jax.tree.map(lambda a, b: bool(jnp.any(a != b)), old_stats, new_stats)
        )
        assert all(moved) if bn_train else not any(moved)
        # Either way the parameters train.
        assert any(
            jax.tree.leaves(
                jax.tree.map(
                    lambda a, b: bool(jnp.any(a != b)), variables["params"], new.variables["params"]
                )
            )
        )
        assert int(new.count) == B


@given(seed=seeds, data=st.data())
def test_padded_examples_change_nothing(
    variables: Variables, seed: int, data: st.DataObject
) -> None:
    """A batch of B real examples == the same examples among B masked ones, in any positions."""
    spec, step = jitted_step(True)
    x, y = batch(seed, 2 * B)
    positions = np.asarray(data.draw(st.permutations(range(2 * B))))
    real = positions[:B]
    mask = np.zeros(2 * B, bool)
    mask[real] = True
    state = client_lib.init_state(spec, variables)
    padded = step({}, state, client_lib.Batch(x, y, jnp.asarray(mask)))
    plain = step({}, state, client_lib.Batch(x[np.sort(real)], y[np.sort(real)], jnp.ones(B, bool)))
    assert_trees_close(padded, plain, rtol=1e-4, atol=1e-5)
    assert int(padded.count) == B


def test_fully_masked_step_is_a_no_op(variables: Variables) -> None:
    """A step with no real example returns the state unchanged, bit for bit."""
    spec, step = jitted_step(True)
    x, y = batch(0, 2 * B)
    state = client_lib.init_state(spec, variables)
    assert_trees_equal(step({}, state, client_lib.Batch(x, y, jnp.zeros(2 * B, bool))), state)


@functools.cache
def prox_grads(policy: str) -> Any:
    """jit: (grad without prox, grad with mu=MU) of the local loss, anchor = ``policy``'s shared."""
    plain = LocalTraining(tiny_cnn(), sgd(), mu=0.0)
    prox = LocalTraining(tiny_cnn(), sgd(), mu=MU)

    def grads(params, rest, anchor, x, y, mask):
        g = [
            jax.grad(
                lambda p, s=s: client_lib.loss_fn(s, p, rest, anchor, client_lib.Batch(x, y, mask))[
                    0
                ]
            )(params)
            for s in (plain, prox)
        ]
        return tuple(g)

    return jax.jit(grads)


@pytest.mark.parametrize("policy", ["fedbn", "fedavg"])
@given(seed=seeds)
def test_prox_gradient_is_g_plus_mu_times_distance_on_shared_params(
    variables: Variables, policy: str, seed: int
) -> None:
    """grad(loss + mu/2 ||w - w_g||^2) = g + mu (w - w_g) on the anchor's leaves, g elsewhere."""
    anchor = partition(variables, policy).shared  # what the server sends as w_global
    params = jax.tree.map(
        lambda w: w + 0.3 * normal(seed, w.shape, salt=w.size), variables["params"]
    )  # the client has moved away from the anchor
    x, y = batch(seed, B)
    g0, g_mu = prox_grads(policy)(
        params, {"batch_stats": variables["batch_stats"]}, anchor, x, y, jnp.ones(B, bool)
    )
    flat_anchor = flatten(anchor)
    is_bn = flatten(bn_param_mask(variables))
    flat_w, flat_g0, flat_gmu = flatten(params), flatten(g0), flatten(g_mu)
    assert len(flat_w) == len(is_bn)
    for path, w in flat_w.items():
        extra = np.asarray(flat_gmu[path]) - np.asarray(flat_g0[path])
        if ("params", *path) in flat_anchor:
            want = MU * (np.asarray(w) - np.asarray(flat_anchor[("params", *path)]))
            np.testing.assert_allclose(extra, want, rtol=1e-4, atol=1e-5)
            assert np.any(want != 0)
        else:  # BN-local under fedbn: the proximal term does not reach it
            assert policy == "fedbn" and is_bn[path]
            np.testing.assert_array_equal(extra, 0.0)
    n_local = sum(1 for p in flat_w if ("params", *p) not in flat_anchor)
    assert n_local == (sum(is_bn.values()) if policy == "fedbn" else 0)


def test_prox_term_hand_computed() -> None:
    """0.5 * ||(1, 2) - (0, 4)||^2 = 2.5; the local leaf is not in it."""
    params = {"params": {"a": jnp.array([1.0, 2.0]), "bn": jnp.array([5.0])}}
    anchor = {"params": {"a": jnp.array([0.0, 4.0])}}  # "bn" is local: not in the anchor
    np.testing.assert_allclose(client_lib.prox_term(params, anchor), 0.5 * (1.0 + 4.0))


def test_masked_cross_entropy_hand_computed() -> None:
    """The default task's CE sum and correct count over unmasked rows only."""
    logits = jnp.array([[0.0, 0.0, 0.0], [0.0, 5.0, 0.0], [9.0, 0.0, 0.0]])
    y = jnp.array([0, 1, 1])
    task = fb.make_task(tiny_cnn())
    ce, sums = client_lib.batch_sums(task, logits, y, jnp.array([True, True, False]))
    correct = sums["accuracy"]
    want_ce = np.log(3.0) + (np.log(np.exp(5.0) + 2.0) - 5.0)
    np.testing.assert_allclose(ce, want_ce, rtol=1e-6)
    assert int(correct) == 2  # row 0 (tie -> argmax 0) and row 1; row 2 is masked


@functools.cache
def jitted_update(loop: str) -> Any:
    """One jitted ``client_update`` of the counter model per local loop."""
    spec = LocalTraining(CounterModel(), sgd())
    return jax.jit(functools.partial(client_update, spec, loop=loop))


def test_scan_and_unroll_local_loops_agree(sample_x: jax.Array) -> None:
    """Both local loops give the same client result; metrics and the int32 step counter count
    only real examples and steps."""
    spec = LocalTraining(CounterModel(), sgd())
    variables = dict(CounterModel().init(jax.random.key(0), sample_x, train=False))
    n, n_max = 6, 8
    data = make_clients(3, (n,), n_max=n_max)
    idx = jnp.asarray(randint(3, (3, B), n))  # 3 steps of B over the n real examples
    mask = jnp.asarray(np.arange(3 * B).reshape(3, B) < n)  # B real, n - B real, none
    got = {
        loop: jitted_update(loop)(variables, {}, data.x[0], data.y[0], idx, mask)
        for loop in ("scan", "unroll")
    }
    assert_trees_close(got["scan"], got["unroll"], rtol=1e-4, atol=1e-5)
    assert int(got["scan"].num_seen) == n
    counter = got["scan"].variables["batch_stats"]["CountedBN_0"]["num_batches_tracked"]
    assert counter.dtype == jnp.int32 and int(counter) == 2  # the empty step is a no-op
    assert 0.0 <= float(got["scan"].accuracy) <= 1.0
    assert float(got["scan"].loss) > 0.0
    with pytest.raises(ValueError, match="local loop"):
        client_update(spec, variables, None, data.x[0], data.y[0], idx, mask, loop="x")
