"""Tests for the server-optimizer family (fedopt.py), SCAFFOLD (scaffold.py) and ``bn_stats``.

Rounds use two geometries only, so each round function compiles once: CounterModel clients of
sizes SIZES (N_max 8, batch 8: one full-batch step per client and epoch), and a linear model
without BN for the hand-computed SCAFFOLD case. Hand computations are numpy, never a run.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import (
    IMAGE_SHAPE,
    CounterModel,
    assert_trees_close,
    assert_trees_equal,
    make_clients,
    random_like,
    sgd,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn.algorithms import Algorithm, FedState, Message, ServerState, server_step
from fedjax_bn.algorithms.base import client_variables
from fedjax_bn.algorithms.scaffold import ScaffoldMessage
from fedjax_bn.data import ClientArrays
from fedjax_bn.policy import float_leaves, partition
from fedjax_bn.tree import flatten, repeat_clients

C, N_MAX, B = 2, 8, 8
SIZES = (5, 8)  # a masked partial batch and a full one; batch 8: one step per client
MODEL = CounterModel()
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
seeds = st.integers(0, 2**31 - 1)
COUNTER = ("batch_stats", "CountedBN_0", "num_batches_tracked")
SERVER_OPTS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")


@functools.cache
def algorithm(name: str, policy: str = "fedavg") -> Algorithm:
    """One algorithm object per (name, policy), so their jitted rounds are shared."""
    tx = sgd()
    build = {
        "base": lambda: fb.make_algorithm(MODEL, tx, policy=policy),
        "server_sgd1": lambda: fb.make_algorithm(
            MODEL, tx, policy=policy, server_tx=optax.sgd(1.0)
        ),
        "fedavgm0": lambda: fb.fedavgm(MODEL, tx, momentum=0.0, server_lr=1.0, policy=policy),
        "fedavgm": lambda: fb.fedavgm(MODEL, tx, policy=policy),
        "fedadam": lambda: fb.fedadam(MODEL, tx, policy=policy),
        "fedyogi": lambda: fb.fedyogi(MODEL, tx, policy=policy),
        "fedadagrad": lambda: fb.fedadagrad(MODEL, tx, policy=policy),
        "scaffold": lambda: fb.scaffold(MODEL, tx, lr=0.1, policy=policy),
        "mean_stats": lambda: fb.make_algorithm(MODEL, tx, policy=policy, bn_stats="mean"),
    }
    return build[name]()


@functools.cache
def round_fn(name: str, policy: str = "fedavg", epochs: int = 1) -> Any:
    return fb.make_round(
        algorithm(name, policy), executor="sequential", batch_size=B, local_epochs=epochs
    )


def start(name: str, policy: str = "fedavg") -> FedState:
    return algorithm(name, policy).init(jax.random.key(0), SAMPLE_X, C)


def model_of(state: FedState) -> tuple[Any, Any, Any]:
    """The model parts of a state (what two algorithms must agree on), no optimizer state."""
    return state.server.shared, state.server.pooled, state.clients.local


def run_rounds(name: str, policy: str, rounds: int, seed: int = 0) -> FedState:
    state = start(name, policy)
    for r in range(rounds):
        data = make_clients(seed + r, SIZES, n_max=N_MAX)
        state, _ = round_fn(name, policy)(state, data, jax.random.key(seed + r))
    return state


def all_finite(tree: Any) -> bool:
    return all(
        bool(np.all(np.isfinite(np.asarray(x))))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    )


def fake_messages(policy: str, seed: int, num_clients: int) -> Message:
    """Stacked messages of random client variables (non-negative, so variances are valid)."""
    one = client_variables(start("base", policy), 0)
    stacked = jax.tree.map(np.abs, random_like(repeat_clients(one, num_clients), seed))
    parts = partition(stacked, policy)
    return Message(parts.shared, parts.pooled)


# ------------------------------------------------------------------ server optimizers


@pytest.mark.parametrize("policy", ["fedavg", "fedbn"])
def test_fedavg_equals_server_sgd_lr_one(policy: str) -> None:
    """``server_tx=optax.sgd(1.0)`` steps the pseudo-gradient back to the mean: FedAvg."""
    a = run_rounds("base", policy, 2)
    b = run_rounds("server_sgd1", policy, 2)
    assert int(a.round) == int(b.round) == 2
    assert_trees_close(model_of(a), model_of(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["fedavg", "fedbn"])
def test_fedavgm_without_momentum_is_fedavg(policy: str) -> None:
    """FedAvgM with momentum 0 and server lr 1 is FedAvg."""
    a = run_rounds("base", policy, 2, seed=3)
    b = run_rounds("fedavgm0", policy, 2, seed=3)
    assert_trees_close(model_of(a), model_of(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["fedavg", "fedbn"])
@pytest.mark.parametrize("name", SERVER_OPTS)
def test_server_optimizers_run_a_round(name: str, policy: str) -> None:
    """Every server optimizer runs a round under either policy: finite state, moved model."""
    before = start(name, policy)
    new = run_rounds(name, policy, 1, seed=7)
    assert int(new.round) == 1
    assert all_finite(new)
    assert all_finite(new.server.opt_state)
    moved = [
        np.any(np.asarray(u) != np.asarray(v))
        for u, v in zip(
            jax.tree.leaves(new.server.shared), jax.tree.leaves(before.server.shared), strict=True
        )
    ]
    assert any(moved)


def opt_state_paths(opt_state: Any) -> list[tuple[str, ...]]:
    """The variable paths that key the leaves of an optimizer state over ``float_leaves``."""
    paths = []
    for keypath, _ in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        keys = [k.key for k in keypath if isinstance(k, jax.tree_util.DictKey)]
        paths.extend(k for k in keys if isinstance(k, tuple))
    return paths


@pytest.mark.parametrize("policy", ["fedavg", "fedbn"])
@settings(max_examples=4)
@given(seed=seeds, data=st.data())
def test_server_optimizer_acts_on_shared_floats_only(
    policy: str, seed: int, data: st.DataObject
) -> None:
    """Under FedAdam the pooled BN statistics are exactly FedAvg's from the same messages, the
    int32 counter keeps value and dtype, and Adam's state covers the shared float params only."""
    weights = np.asarray(data.draw(st.lists(st.integers(0, 9), min_size=3, max_size=3)), np.float32)
    assume(weights.sum() > 0)
    adam, avg = algorithm("fedadam", policy), algorithm("base", policy)
    server = start("fedadam", policy).server
    messages = fake_messages(policy, seed, 3)
    new = adam.server_update(server, messages, weights)
    ref = avg.server_update(ServerState(server.shared, server.pooled), messages, weights)
    assert_trees_equal(new.pooled, ref.pooled)
    if policy == "fedavg":
        counter = flatten(new.pooled)[COUNTER]
        assert counter.dtype == jnp.int32
        assert int(counter) == int(flatten(server.pooled)[COUNTER])
    shared_floats = set(float_leaves(server.shared))
    assert shared_floats and all(p[0] == "params" for p in shared_floats)
    if policy == "fedbn":
        assert not any("CountedBN_0" in p for p in shared_floats)
    for opt_state in (server.opt_state, new.opt_state):
        paths = opt_state_paths(opt_state)
        assert set(paths) == shared_floats
        assert not any(p[0] == "batch_stats" for p in paths)
    assert all_finite(new.shared)


def test_server_step_keeps_integer_leaves() -> None:
    """An integer leaf among the shared variables is never stepped: value and dtype kept."""
    tx = optax.adam(0.5)
    shared = {"params": {"w": jnp.array([1.0, 2.0]), "n": jnp.array(7, jnp.int32)}}
    mean = {"params": {"w": jnp.array([0.0, 4.0]), "n": jnp.array(99, jnp.int32)}}
    opt_state = tx.init(float_leaves(shared))
    assert set(opt_state_paths(opt_state)) == {("params", "w")}
    new, _ = server_step(tx, shared, opt_state, mean)
    assert new["params"]["n"].dtype == jnp.int32 and int(new["params"]["n"]) == 7
    # Adam's first step is -lr * sign(g) (up to eps): g = shared - mean = [1, -2].
    np.testing.assert_allclose(new["params"]["w"], [0.5, 2.5], rtol=1e-5)


class OneParam(nn.Module):
    """A model with a single float parameter ``w`` (only its init and server side are used)."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        w = self.param("w", nn.initializers.zeros, ())
        return x.reshape((x.shape[0], -1)) * w


@given(
    eta=st.floats(0.1, 2.0),
    beta=st.floats(0.0, 0.95),
    values=st.lists(st.floats(-5.0, 5.0), min_size=5, max_size=5),
    w=st.tuples(st.integers(1, 9), st.integers(0, 9)),
)
def test_fedavgm_two_server_steps_by_hand(
    eta: float, beta: float, values: list[float], w: tuple[int, int]
) -> None:
    """FedAvgM (server SGD, lr eta, momentum beta): g = x - mean, t = g + beta t, x -= eta t."""
    alg = fb.fedavgm(OneParam(), sgd(), server_lr=eta, momentum=beta)
    x0, r1, r2 = values[0], values[1:3], values[3:5]
    server = alg.init({"params": {"w": np.float32(x0)}}, jnp.zeros((1, 1)), 2).server
    weights = np.asarray(w, np.float32)
    x, t = np.float64(np.float32(x0)), 0.0
    for msgs in (r1, r2):
        stacked = {"params": {"w": jnp.asarray(msgs, jnp.float32)}}
        server = alg.server_update(server, Message(stacked, {}), weights)
        mean = np.dot(weights, np.asarray(msgs, np.float32)) / weights.sum()
        t = (x - mean) + beta * t
        x = x - eta * t
        np.testing.assert_allclose(float(server.shared["params"]["w"]), x, rtol=1e-4, atol=1e-4)
    assert server.pooled == {}


# ------------------------------------------------------------------ bn_stats


def test_bn_stats_mean_versus_pooled_by_hand() -> None:
    """Two clients, BN means 0 and 4, variances 1 and 2, weights 1 and 3: both rules give
    mean 3; "mean" gives variance (1 + 3*2)/4 = 7/4, "pooled" adds the spread of the means
    (0 + 3*16)/4 - 9 = 3, so 19/4. The integer counter keeps the server's value."""
    messages = fake_messages("fedavg", 0, 2)
    flat = flatten(messages.pooled)
    bn = ("batch_stats", "CountedBN_0", "bn")
    width = flat[(*bn, "mean")].shape[1]
    flat[(*bn, "mean")] = np.stack([np.zeros(width), np.full(width, 4.0)]).astype(np.float32)
    flat[(*bn, "var")] = np.stack([np.ones(width), np.full(width, 2.0)]).astype(np.float32)
    messages = messages._replace(pooled=fb.tree.unflatten(flat))
    weights = np.array([1.0, 3.0], np.float32)
    server = start("base").server
    got = {}
    for rule, name in (("pooled", "base"), ("mean", "mean_stats")):
        got[rule] = flatten(algorithm(name).server_update(server, messages, weights).pooled)
        np.testing.assert_allclose(got[rule][(*bn, "mean")], np.full(width, 3.0), rtol=1e-6)
        assert int(got[rule][COUNTER]) == int(flatten(server.pooled)[COUNTER])
        assert got[rule][COUNTER].dtype == jnp.int32
    np.testing.assert_allclose(got["mean"][(*bn, "var")], np.full(width, 7 / 4), rtol=1e-6)
    np.testing.assert_allclose(got["pooled"][(*bn, "var")], np.full(width, 19 / 4), rtol=1e-6)


# ------------------------------------------------------------------ SCAFFOLD


@pytest.mark.parametrize("policy", ["fedavg", "fedbn"])
def test_scaffold_with_zero_controls_and_one_step_is_fedavg(policy: str) -> None:
    """From the initial state (c = c_i = 0), one local step per client: FedAvg's round."""
    data = make_clients(11, SIZES, n_max=N_MAX)
    key = jax.random.key(11)
    s0 = start("scaffold", policy)
    assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(s0.server.control))
    assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(s0.clients.control))
    sc, sc_metrics = round_fn("scaffold", policy)(s0, data, key)
    avg, avg_metrics = round_fn("base", policy)(start("base", policy), data, key)
    assert_trees_close(model_of(sc), model_of(avg), rtol=1e-6, atol=1e-7)
    no_bytes = {"uplink_bytes": None, "downlink_bytes": None}  # SCAFFOLD also sends c_i's change
    assert_trees_close(
        sc_metrics._replace(**no_bytes), avg_metrics._replace(**no_bytes), rtol=1e-6, atol=1e-7
    )
    assert np.all(np.asarray(sc_metrics.uplink_bytes) > np.asarray(avg_metrics.uplink_bytes))
    assert all_finite(sc.server.control) and all_finite(sc.clients.control)


def test_scaffold_with_mu_applies_the_proximal_term() -> None:
    """SCAFFOLD's client step keeps FedProx's term: with mu > 0 after two local steps the model
    differs from mu = 0 (the anchor only matters once the weights moved), as fedprox differs
    from fedavg."""
    data = make_clients(12, SIZES, n_max=N_MAX)
    key = jax.random.key(12)
    out = {}
    for mu in (0.0, 5.0):
        alg = fb.scaffold(MODEL, sgd(), lr=0.1, mu=mu)
        rnd = fb.make_round(alg, executor="sequential", batch_size=4, local_epochs=1)
        out[mu], _ = rnd(alg.init(jax.random.key(0), SAMPLE_X, C), data, key)
    diffs = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(
            jax.tree.leaves(out[0.0].server.shared),
            jax.tree.leaves(out[5.0].server.shared),
            strict=True,
        )
    ]
    assert max(diffs) > 1e-6


def test_scaffold_controls_cover_shared_params_only() -> None:
    """Under fedbn the control variates hold no BN scale/bias and no batch_stats path, before
    and after a round, on the server and on every client."""
    s0 = start("scaffold", "fedbn")
    want = set(float_leaves(s0.server.shared))
    assert want and not any("CountedBN_0" in p or p[0] == "batch_stats" for p in want)
    new, _ = round_fn("scaffold", "fedbn")(
        s0, make_clients(2, SIZES, n_max=N_MAX), jax.random.key(2)
    )
    for state in (s0, new):
        assert set(flatten(state.server.control)) == want
        assert set(flatten(state.clients.control)) == want
        for path, leaf in flatten(state.clients.control).items():
            assert leaf.shape == (C, *flatten(state.server.shared)[path].shape)
    # the BN affine parameters are local: one row per client, absent from the shared model
    assert ("params", "CountedBN_0", "bn", "scale") in flatten(new.clients.local)


class Linear(nn.Module):
    """``logits = x @ w``: no BN, no bias, softmax cross-entropy has a closed-form gradient."""

    num_inputs: int = 3
    num_classes: int = 2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        w = self.param("w", nn.initializers.zeros, (self.num_inputs, self.num_classes))
        return x.reshape((x.shape[0], -1)) @ w


D, K_CLASSES, ETA, LOCAL_EPOCHS = 3, 2, 0.3, 2
LIN_SIZES = (3, 4, 0)  # the third client holds no data: it does not take part


def ce_grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Gradient of mean softmax cross-entropy of ``x @ w``: ``X^T (softmax(XW) - onehot) / n``."""
    z = x @ w
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    return x.T @ (p - np.eye(w.shape[1])[y]) / len(y)


@functools.cache
def linear_scaffold() -> Algorithm:
    return fb.scaffold(Linear(D, K_CLASSES), optax.sgd(ETA), lr=ETA)


@functools.cache
def linear_round(executor: str) -> Any:
    return fb.make_round(
        linear_scaffold(),
        executor=executor,
        batch_size=max(LIN_SIZES),
        local_epochs=LOCAL_EPOCHS,
    )


@pytest.mark.parametrize("executor", ["sequential", "vmap"])
@settings(max_examples=3)
@given(seed=seeds)
def test_scaffold_option_two_by_hand(executor: str, seed: int) -> None:
    """Non-zero c and c_i, two full-batch SGD steps per client, |S| = 2 of N = 3 clients:
    y_i by hand, ``c_i+ = c_i - c + (x - y_i)/(K eta)``, ``c+ = c + |S|/N mean(c_i+ - c_i)``,
    global = size-weighted mean of the y_i; the idle client keeps its c_i."""
    rng = np.random.default_rng(seed)
    n_max = max(LIN_SIZES)
    xs = [rng.normal(size=(n, D)) for n in LIN_SIZES]
    ys = [rng.integers(0, K_CLASSES, n) for n in LIN_SIZES]
    x_arr = np.zeros((len(LIN_SIZES), n_max, D), np.float32)
    y_arr = np.zeros((len(LIN_SIZES), n_max), np.int32)
    for c, (xc, yc) in enumerate(zip(xs, ys, strict=True)):
        x_arr[c, : len(yc)], y_arr[c, : len(yc)] = xc, yc
    train = ClientArrays(
        x=jnp.asarray(x_arr), y=jnp.asarray(y_arr), n=jnp.asarray(LIN_SIZES, jnp.int32)
    )
    w0 = rng.normal(size=(D, K_CLASSES)).astype(np.float32)
    c_srv = rng.normal(size=(D, K_CLASSES)).astype(np.float32)
    c_cl = rng.normal(size=(len(LIN_SIZES), D, K_CLASSES)).astype(np.float32)

    alg = linear_scaffold()
    state = alg.init({"params": {"w": w0}}, jnp.zeros((1, D)), len(LIN_SIZES))
    state = state._replace(
        server=state.server._replace(control={"params": {"w": jnp.asarray(c_srv)}}),
        clients=state.clients._replace(control={"params": {"w": jnp.asarray(c_cl)}}),
    )
    new, metrics = linear_round(executor)(state, train, jax.random.key(seed % 1000))

    x = w0.astype(np.float64)
    c64, ci64 = c_srv.astype(np.float64), c_cl.astype(np.float64)
    want_ci = ci64.copy()
    ys_final = {}
    for c, n in enumerate(LIN_SIZES):
        if n == 0:
            continue
        y = x.copy()
        for _ in range(LOCAL_EPOCHS):  # one full batch per epoch
            y = y - ETA * (ce_grad(y, xs[c], ys[c]) + c64 - ci64[c])
        ys_final[c] = y
        want_ci[c] = ci64[c] - c64 + (x - y) / (LOCAL_EPOCHS * ETA)
    took_part = [c for c, n in enumerate(LIN_SIZES) if n > 0]
    want_c = c64 + len(took_part) / len(LIN_SIZES) * np.mean(
        [want_ci[c] - ci64[c] for c in took_part], axis=0
    )
    sizes = np.asarray(LIN_SIZES, np.float64)
    want_w = sum(sizes[c] * ys_final[c] for c in took_part) / sizes.sum()

    np.testing.assert_array_equal(metrics.num_seen, np.asarray(LIN_SIZES) * LOCAL_EPOCHS)
    np.testing.assert_allclose(new.server.shared["params"]["w"], want_w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.clients.control["params"]["w"], want_ci, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new.server.control["params"]["w"], want_c, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(new.clients.control["params"]["w"][2], c_cl[2])


@given(seed=seeds, num_clients=st.integers(3, 6))
def test_scaffold_zero_weight_client_does_not_take_part(seed: int, num_clients: int) -> None:
    """server_update: a zero-weight client's delta neither counts in |S| nor in the mean;
    ``c+ = c + (|S|/N) * mean_{i in S} delta_i`` with N the population given to init."""
    alg = linear_scaffold()
    rng = np.random.default_rng(seed)
    server = alg.init(jax.random.key(0), jnp.zeros((1, D)), num_clients).server
    c = rng.normal(size=(D, K_CLASSES)).astype(np.float32)
    server = server._replace(control={"params": {"w": jnp.asarray(c)}})
    w_C = rng.normal(size=(3, D, K_CLASSES)).astype(np.float32)
    d_C = rng.normal(size=(3, D, K_CLASSES)).astype(np.float32)  # non-zero for the idle one too
    weights = np.array([2.0, 0.0, 3.0], np.float32)
    msg = ScaffoldMessage({"params": {"w": jnp.asarray(w_C)}}, {}, {"params": {"w": d_C}})
    new = alg.server_update(server, msg, weights)
    want_c = c + (2 / num_clients) * (d_C[0] + d_C[2]) / 2
    np.testing.assert_allclose(new.control["params"]["w"], want_c, rtol=1e-5, atol=1e-6)
    want_w = (2 * w_C[0] + 3 * w_C[2]) / 5
    np.testing.assert_allclose(new.shared["params"]["w"], want_w, rtol=1e-5, atol=1e-6)
    assert int(new.num_clients) == num_clients


def test_scaffold_rejects_non_positive_lr() -> None:
    with pytest.raises(ValueError, match="lr > 0"):
        fb.scaffold(MODEL, sgd(), lr=0.0)
