"""Tests for fedjax_bn.algorithms (and the executors that run them): policies end to end.

Every round here uses one geometry (3 clients of sizes SIZES, N_max 8, batch 4, 1 epoch): a
round's jitted code depends on the clients' sizes, so each round compiles once per module and
hypothesis varies only values (data, keys, weights).
"""

from __future__ import annotations

import collections
import functools
import math
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
from hypothesis import assume, given
from hypothesis import strategies as st

import fedjax_bn as fb
from fedjax_bn.algorithms import Algorithm, FedState, Message, model_parts
from fedjax_bn.algorithms.base import INIT_OPT_LEVEL, client_variables, init_compiler_options
from fedjax_bn.execution import client_update, round_batches
from fedjax_bn.policy import partition
from fedjax_bn.tree import flatten, repeat_clients, take_client

C, N_MAX, B, EPOCHS = 3, 8, 4, 1
MU = 0.5
SIZES = (5, 8, 0)  # different sizes, a partial batch, and an empty (padded) client
seeds = st.integers(0, 2**31 - 1)
TRACES: collections.Counter[bool] = collections.Counter()


class Traced(nn.Module):
    """CounterModel (dense + BN with an int32 counter + dense) that counts its own traces."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        TRACES[train] += 1  # a Python side effect: runs once per trace, never in compiled code
        return CounterModel(name="net")(x, train=train, mask=mask)


MODEL = Traced()
TX = sgd()
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
ALGORITHMS = {
    "fedavg": lambda: fb.fedavg(MODEL, TX),
    "fedprox": lambda: fb.fedprox(MODEL, TX, MU),
    "fedprox0": lambda: fb.fedprox(MODEL, TX, 0.0),
    "fedbn": lambda: fb.fedbn(MODEL, TX),
    "silobn": lambda: fb.silobn(MODEL, TX),
}
MAIN = ("fedavg", "fedprox", "fedbn", "silobn")


@functools.cache
def algorithm(name: str) -> Algorithm:
    """One algorithm object per name, so its jitted rounds are shared by all tests."""
    return ALGORITHMS[name]()


@functools.cache
def initial_state(name: str) -> FedState:
    """The server state after ``init``, with local leaves made to differ between clients."""
    state = algorithm(name).init(jax.random.key(0), SAMPLE_X, C)

    def spread(x: jax.Array) -> jax.Array:
        k = jnp.arange(C).reshape((C,) + (1,) * (x.ndim - 1))
        return x + (k if jnp.issubdtype(x.dtype, jnp.integer) else 0.1 * k).astype(x.dtype)

    clients = state.clients._replace(local=jax.tree.map(spread, state.clients.local))
    return state._replace(clients=clients)


@functools.cache
def round_fn(name: str, executor: str) -> Any:
    """One round function per (algorithm, executor): each compiles once for SIZES."""
    return fb.make_round(algorithm(name), executor=executor, batch_size=B, local_epochs=EPOCHS)


# One jitted reference client update shared by all algorithms (spec static, hashable).
_reference_update = jax.jit(client_update, static_argnums=0, static_argnames="loop")


def reference_round(name: str, state: FedState, data: Any, key: jax.Array) -> dict[str, Any]:
    """What a round must give, from each client trained alone and the policy table in numpy."""
    alg = algorithm(name)
    n = np.asarray(data.n)
    idx, mask = round_batches(key, data.n, N_MAX, B, EPOCHS)
    results = {}
    for c in np.flatnonzero(n):
        start = client_variables(state, c)
        results[c] = _reference_update(
            alg.local,
            start,
            state.server.shared,
            data.x[c],
            data.y[c],
            idx[c],
            mask[c],
            loop="unroll",
        )
    parts = {c: partition(r.variables, alg.policy) for c, r in results.items()}
    w = n / n.sum()

    def mean(part: str) -> dict[tuple[str, ...], np.ndarray]:
        flat = {c: flatten(getattr(p, part)) for c, p in parts.items()}
        out = {}
        for path, server in flatten(getattr(model_parts(state), part)).items():
            if jnp.issubdtype(server.dtype, jnp.integer):
                out[path] = np.asarray(server)  # never averaged: the server's value
            else:
                out[path] = sum(w[c] * np.asarray(f[path], np.float64) for c, f in flat.items())
        return out

    shared, pooled = mean("shared"), mean("pooled")
    for path in list(pooled):
        if path[-1] == "var":  # pooled variance: E[var_k + mean_k^2] - mean^2
            mpath = path[:-1] + ("mean",)
            flat = {c: flatten(p.pooled) for c, p in parts.items()}
            second = sum(
                w[c] * (np.asarray(f[path], np.float64) + np.asarray(f[mpath], np.float64) ** 2)
                for c, f in flat.items()
            )
            pooled[path] = second - pooled[mpath] ** 2
    local = {}
    for path, stacked in flatten(state.clients.local).items():
        rows = [
            np.asarray(flatten(parts[c].local)[path]) if c in parts else np.asarray(stacked[c])
            for c in range(C)
        ]
        local[path] = np.stack(rows)
    return {"shared": shared, "pooled": pooled, "local": local}


def assert_state_matches(state: FedState, want: dict[str, Any], before: FedState) -> None:
    """Every part of ``state`` matches the reference, keeping dtypes and shapes."""
    for part in ("shared", "pooled", "local"):
        got = flatten(getattr(model_parts(state), part))
        old = flatten(getattr(model_parts(before), part))
        assert set(got) == set(want[part]) == set(old)
        for path, leaf in got.items():
            assert leaf.dtype == old[path].dtype and leaf.shape == old[path].shape, path
            if jnp.issubdtype(leaf.dtype, jnp.integer):
                np.testing.assert_array_equal(leaf, want[part][path], err_msg=str(path))
            else:
                np.testing.assert_allclose(
                    leaf, want[part][path], rtol=1e-4, atol=1e-5, err_msg=str(path)
                )


@pytest.mark.parametrize("name", MAIN)
@given(seed=seeds)
def test_round_equals_clients_trained_alone_then_policy(name: str, seed: int) -> None:
    """A vmapped round == each client trained alone + the policy table; empty clients: no-ops."""
    sizes = SIZES
    state = initial_state(name)
    data = make_clients(seed, sizes, n_max=N_MAX)
    key = jax.random.key(seed)
    new, metrics = round_fn(name, "vmap")(state, data, key)
    assert_state_matches(new, reference_round(name, state, data, key), state)
    np.testing.assert_array_equal(metrics.num_seen, sizes)
    assert int(new.round) == int(state.round) + 1


@pytest.mark.parametrize("name", ["fedavg", "fedbn", "silobn"])
def test_integer_counter_keeps_value_and_dtype(name: str) -> None:
    """The int32 ``num_batches_tracked`` leaf is never averaged: pooled under fedavg it keeps
    the server's value; local under fedbn/silobn it counts each client's own steps."""
    state = initial_state(name)
    sizes = SIZES
    new, _ = round_fn(name, "vmap")(state, make_clients(1, sizes, n_max=N_MAX), jax.random.key(1))
    path = ("batch_stats", "net", "CountedBN_0", "num_batches_tracked")
    if name == "fedavg":
        counter = flatten(new.server.pooled)[path]
        assert counter.dtype == jnp.int32
        assert int(counter) == int(flatten(state.server.pooled)[path])
    else:
        counter = flatten(new.clients.local)[path]
        assert counter.dtype == jnp.int32
        before = np.asarray(flatten(state.clients.local)[path])
        steps = [math.ceil(n / B) * EPOCHS for n in sizes]
        np.testing.assert_array_equal(counter, before + np.asarray(steps))


@pytest.mark.parametrize("name", MAIN)
@given(seed=seeds)
def test_vmap_executor_equals_sequential(name: str, seed: int) -> None:
    """Both executors give the same state and metrics for clients of sizes 5, 8 and 0."""
    state = initial_state(name)
    data = make_clients(seed, SIZES, n_max=N_MAX)
    key = jax.random.key(seed)
    got = {ex: round_fn(name, ex)(state, data, key) for ex in ("vmap", "sequential")}
    assert_trees_close(got["vmap"], got["sequential"], rtol=1e-4, atol=1e-5)


def test_fedprox_with_mu_zero_is_fedavg() -> None:
    """mu=0 builds FedAvg's local training and gives its round bit for bit; mu>0 does not."""
    assert algorithm("fedprox0").local == algorithm("fedavg").local
    assert algorithm("fedprox0").policy == "fedavg"
    state = initial_state("fedavg")
    data = make_clients(2, SIZES, n_max=N_MAX)
    key = jax.random.key(2)
    prox0, _ = round_fn("fedprox0", "vmap")(state, data, key)
    avg, _ = round_fn("fedavg", "vmap")(state, data, key)
    assert_trees_equal(prox0, avg)
    prox, _ = round_fn("fedprox", "vmap")(state, data, key)  # while mu > 0 does change it
    assert any(
        np.any(np.asarray(a) != np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(prox.server.shared), jax.tree.leaves(avg.server.shared), strict=True
        )
    )


@pytest.mark.parametrize("executor", ["vmap", "sequential"])
@given(seed=seeds, c=st.integers(0, 1))
def test_fedbn_never_changes_another_clients_bn_leaves(executor: str, seed: int, c: int) -> None:
    """Changing client c's data changes client c's local leaves and the shared model, but no
    other client's local leaves; the empty client's stay exactly as they were."""
    state = initial_state("fedbn")
    rnd, key = round_fn("fedbn", executor), jax.random.key(seed)
    data = make_clients(seed, SIZES, n_max=N_MAX)
    other = make_clients(seed + 1, SIZES, n_max=N_MAX)
    changed = data.replace(x=data.x.at[c].set(other.x[c]), y=data.y.at[c].set(other.y[c]))
    a, _ = rnd(state, data, key)
    b, _ = rnd(state, changed, key)
    before = flatten(state.clients.local)
    for path, leaf_a in flatten(a.clients.local).items():
        leaf_b = flatten(b.clients.local)[path]
        for k in range(C):
            if k != c:
                np.testing.assert_array_equal(leaf_a[k], leaf_b[k], err_msg=str((k, path)))
        np.testing.assert_array_equal(leaf_a[2], before[path][2], err_msg=str(path))
        if not jnp.issubdtype(leaf_a.dtype, jnp.integer):  # the step counter is data-blind
            assert np.any(np.asarray(leaf_a[c]) != np.asarray(leaf_b[c])), path
    assert any(
        np.any(np.asarray(u) != np.asarray(v))
        for u, v in zip(
            jax.tree.leaves(a.server.shared), jax.tree.leaves(b.server.shared), strict=True
        )
    )


@pytest.mark.parametrize("executor", ["vmap", "sequential"])
def test_round_does_not_retrace(executor: str) -> None:
    """After its first call a round never traces the model again (new data values, new keys,
    the state it returned itself)."""
    rnd = round_fn("fedbn", executor)
    state = algorithm("fedbn").init(jax.random.key(0), SAMPLE_X, C)  # exactly as users get it
    key = jax.random.key(5)
    data = make_clients(5, SIZES, n_max=N_MAX)
    state, _ = rnd(state, data, key)
    traces = TRACES.copy()
    assert traces[True] > 0
    for r in range(3):
        other = make_clients(6 + r, SIZES, n_max=N_MAX)  # new values, same sizes
        state, _ = rnd(state, other, jax.random.fold_in(key, r))
    assert traces == TRACES
    assert int(state.round) == 4


# ------------------------------------------------------------------ server_update on its own


def fake_variables(name: str, seed: int, num_clients: int) -> dict[str, Any]:
    """Stacked client variables with random values in the model's exact structure."""
    one = client_variables(initial_state(name), 0)
    return jax.tree.map(np.abs, random_like(repeat_clients(one, num_clients), seed))


def fake_messages(name: str, seed: int, num_clients: int) -> Message:
    """Stacked client messages (shared and poolable leaves) of random client variables."""
    parts = partition(fake_variables(name, seed, num_clients), algorithm(name).policy)
    return Message(parts.shared, parts.pooled)


def server_state(name: str) -> Any:
    """The initial server state."""
    return initial_state(name).server


@pytest.mark.parametrize("name", ["fedavg", "fedbn", "silobn"])
@given(c=st.integers(2, 4), seed=seeds, data=st.data())
def test_server_update_ignores_client_order(
    name: str, c: int, seed: int, data: st.DataObject
) -> None:
    """Permuting clients leaves the new shared and pooled leaves alone."""
    alg = algorithm(name)
    weights = np.asarray(
        data.draw(st.lists(st.integers(0, 50), min_size=c, max_size=c)), np.float32
    )
    assume(weights.sum() > 0)
    perm = np.asarray(data.draw(st.permutations(range(c))))
    messages = fake_messages(name, seed, c)
    state = server_state(name)
    a = alg.server_update(state, messages, weights)
    b = alg.server_update(state, take_client(messages, perm), weights[perm])
    assert_trees_close((a.shared, a.pooled), (b.shared, b.pooled), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fedavg", "fedbn", "silobn"])
@given(c=st.integers(1, 4), seed=seeds)
def test_server_update_identical_clients_give_back_the_model(name: str, c: int, seed: int) -> None:
    """C identical clients: shared and pooled leaves are that client's (counters: the server's);
    each client's new local leaves are its own trained ones (``client_final``)."""
    alg = algorithm(name)
    one = take_client(fake_variables(name, seed, 1), 0)
    parts = partition(one, alg.policy)
    messages = repeat_clients(Message(parts.shared, parts.pooled), c)
    state = server_state(name)
    weights = np.arange(1, c + 1, dtype=np.float32)
    new = alg.server_update(state, messages, weights)
    integer = jax.tree.map(lambda x: jnp.issubdtype(x.dtype, jnp.integer), parts.pooled)
    pooled_want = jax.tree.map(lambda i, s, m: s if i else m, integer, state.pooled, parts.pooled)
    assert_trees_close((new.shared, new.pooled), (parts.shared, pooled_want), rtol=1e-5, atol=1e-5)
    carry = alg.client_init(state, take_client(initial_state(name).clients, 0))
    carry = carry._replace(local=carry.local._replace(variables=one))
    _, client, _ = alg.client_final(carry)
    assert_trees_equal(client.local, parts.local)


def test_server_update_rejects_zero_weight_and_mismatched_trees() -> None:
    """Zero total weight and client trees that do not match raise a ValueError naming the leaf."""
    alg = algorithm("fedavg")
    messages = fake_messages("fedavg", 0, 2)
    state = server_state("fedavg")
    with pytest.raises(ValueError, match="Total client weight is zero"):
        alg.server_update(state, messages, np.zeros(2, np.float32))
    flat = flatten(messages.shared)
    kernel = ("params", "net", "Dense_0", "kernel")
    missing = messages._replace(
        shared=fb.tree.unflatten({p: v for p, v in flat.items() if p != kernel})
    )
    with pytest.raises(ValueError, match="missing.*params/net/Dense_0/kernel"):
        alg.server_update(state, missing, np.ones(2, np.float32))
    wrong = messages._replace(
        shared=fb.tree.unflatten({**flat, kernel: np.zeros((2, 1, 1), np.float32)})
    )
    with pytest.raises(ValueError, match="params/net/Dense_0/kernel has shape"):
        alg.server_update(state, wrong, np.ones(2, np.float32))
    bn = ("batch_stats", "net", "CountedBN_0", "bn", "mean")
    wrong_bn = messages._replace(
        pooled=fb.tree.unflatten({**flatten(messages.pooled), bn: np.zeros((3, 2), np.float32)})
    )
    with pytest.raises(ValueError, match="net/CountedBN_0/bn/mean"):
        alg.server_update(state, wrong_bn, np.ones(2, np.float32))


# ------------------------------------------------------------------ construction


class NoTrain(nn.Module):
    """No ``train`` argument at all."""

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        return nn.Dense(2)(x)


class PositionalTrain(nn.Module):
    """``train`` that can be passed positionally (and so forgotten by name)."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, mask: jax.Array | None = None) -> jax.Array:
        return nn.BatchNorm(use_running_average=not train)(x)


class NoMask(nn.Module):
    """A keyword-only ``train`` but no ``mask`` for padded examples."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        return nn.BatchNorm(use_running_average=not train)(x)


def test_make_algorithm_validates() -> None:
    """A model without a mode parameter, bad mu, policy, client count, executor, batch size;
    a positional-or-keyword ``train`` and a model without ``mask`` are accepted (the library
    passes the mode by keyword and masks BatchNorm itself, ``tests/test_task.py``)."""
    with pytest.raises(TypeError, match="train_kw"):
        fb.make_algorithm(NoTrain(), sgd(), policy="fedavg")
    for model in (PositionalTrain(), NoMask()):
        assert fb.make_algorithm(model, sgd(), policy="fedbn").task.adapter.train_kw == "train"
    with pytest.raises(ValueError, match="mu must be >= 0"):
        fb.fedprox(MODEL, sgd(), -0.1)
    with pytest.raises(ValueError, match="valid policies"):
        fb.make_algorithm(MODEL, sgd(), policy="fedsgd")
    with pytest.raises(ValueError, match="num_clients"):
        algorithm("fedavg").init(jax.random.key(0), SAMPLE_X, 0)
    with pytest.raises(ValueError, match="valid executors"):
        fb.make_round(algorithm("fedavg"), executor="pmap")
    with pytest.raises(ValueError, match="batch_size"):
        fb.make_round(algorithm("fedavg"), batch_size=0)


def test_names_and_policies() -> None:
    """Each factory picks its policy and FedProx mu."""
    assert [algorithm(n).policy for n in MAIN] == ["fedavg", "fedavg", "fedbn", "silobn"]
    assert [algorithm(n).local.mu for n in MAIN] == [0.0, MU, 0.0, 0.0]
    assert fb.fedbn_prox(MODEL, sgd(), 0.1).policy == "fedbn"
    assert fb.fedbn(MODEL, sgd(), bn_train=False).local.bn_train is False


def test_initial_state_layout() -> None:
    """fedavg: no local leaves; fedbn: BN params and stats local; silobn: only stats local."""
    local = {n: set(flatten(initial_state(n).clients.local)) for n in ("fedavg", "fedbn", "silobn")}
    assert local["fedavg"] == set()
    assert {p[0] for p in local["silobn"]} == {"batch_stats"}
    assert local["fedbn"] - local["silobn"] == {
        ("params", "net", "CountedBN_0", "bn", "scale"),
        ("params", "net", "CountedBN_0", "bn", "bias"),
    }
    for n in ("fedbn", "silobn"):
        assert all(leaf.shape[0] == C for leaf in jax.tree.leaves(initial_state(n).clients))
    assert set(flatten(initial_state("fedavg").server.pooled)) == local["silobn"]


# ------------------------------------------------------------------ end to end on digits

# Measured (seed 0, this config): label skew 0.93-0.95 (all four), feature shift 0.59-0.63.
E2E_ROUNDS = 15
E2E_THRESHOLD = {"label_skew": 0.8, "feature_shift": 0.45}


@pytest.fixture(scope="module", params=["label_skew", "feature_shift"])
def digits(request: pytest.FixtureRequest) -> tuple[str, Any]:
    """The two digits settings (seed 0), built once per module."""
    if request.param == "label_skew":
        return request.param, fb.data.digits_label_skew(10, 0.5, seed=0)
    return request.param, fb.data.digits_feature_shift(10, seed=0)


@pytest.mark.parametrize("name", MAIN)
def test_digits_end_to_end(digits: tuple[str, Any], name: str) -> None:
    """15 rounds on digits reach a measured accuracy (global for fedavg/fedprox, mean
    per-client for fedbn/silobn)."""
    setting, data = digits
    model = fb.SeedCNN(num_classes=10, widths=(8,), hidden=32)
    tx = optax.adam(1e-2)
    alg = {
        "fedavg": fb.fedavg(model, tx),
        "fedprox": fb.fedprox(model, tx, 1e-3),
        "fedbn": fb.fedbn(model, tx),
        "silobn": fb.silobn(model, tx),
    }[name]
    state = alg.init(jax.random.key(0), data.train.x[0, :1], data.num_clients)
    rnd = fb.make_round(alg, executor="sequential", batch_size=32, local_epochs=1)
    key = jax.random.key(100)
    for _ in range(E2E_ROUNDS):
        key, sub = jax.random.split(key)
        state, _ = rnd(state, data.train, sub)
    if name in ("fedavg", "fedprox"):
        accuracy = fb.evaluate_global(alg, state, data).accuracy
    else:
        accuracy = fb.evaluate_clients(alg, state, data).mean_accuracy
    assert accuracy > E2E_THRESHOLD[setting], (setting, name, accuracy)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_init_compiled_fast_gives_the_default_compiled_variables(norm: str) -> None:
    """The init program's cheaper CPU compile options leave the starting weights bitwise
    those of XLA:CPU's default level (same seed, same weights as before the change)."""
    model = fb.SeedCNN(num_classes=10, widths=(4, 8), hidden=16, norm=norm)
    x = jnp.zeros((1, 12, 12, 3))
    lowered = jax.jit(lambda rng, x: model.init(rng, x, train=False)).lower(jax.random.key(3), x)
    fast = lowered.compile(compiler_options={"xla_backend_optimization_level": INIT_OPT_LEVEL})(
        jax.random.key(3), x
    )
    default_level = {"xla_backend_optimization_level": 3}  # XLA:CPU's (tests run at level 0)
    default = lowered.compile(compiler_options=default_level)(jax.random.key(3), x)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(dict(default)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_compiler_options_cpu_only_and_yield_to_xla_flags(monkeypatch) -> None:
    """Level 2 for the CPU init program; nothing on other backends, nor where ``XLA_FLAGS``
    already sets a level (the test suite's level 0)."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert init_compiler_options("cpu") == {"xla_backend_optimization_level": INIT_OPT_LEVEL}
    assert init_compiler_options("gpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert init_compiler_options("cpu") == {}


def test_init_can_be_traced() -> None:
    """``alg.init`` works under ``eval_shape`` and ``jit`` (the multi-host runner shapes the
    state before placing it), with the init program's compile options in place."""
    alg = fb.fedavg(fb.SeedCNN(num_classes=10, widths=(4,), hidden=8), optax.sgd(0.1))
    x = jnp.zeros((1, 8, 8, 1))
    shapes = jax.eval_shape(lambda key: alg.init(key, x, 2), jax.random.key(0))
    state = jax.jit(lambda key: alg.init(key, x, 2))(jax.random.key(0))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes) == jax.tree.map(
        lambda a: (a.shape, a.dtype), state
    )
    assert_trees_equal(state, alg.init(jax.random.key(0), x, 2))
