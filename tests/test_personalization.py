"""Tests for personalization: ``local=`` parts (FedPer, LG-FedAvg), FedRep and Ditto.

Tiny dense models only (no convolutions), few rounds; expectations are properties, hand
computations on a linear model (numpy), or equivalences with local training alone.
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
from conftest import IMAGE_SHAPE, assert_trees_close, assert_trees_equal, make_clients, sgd

import fedjax_bn as fb
from fedjax_bn import client as client_lib
from fedjax_bn.data import FederatedData
from fedjax_bn.evaluate import evaluate_model, fallback_model
from fedjax_bn.policy import AllBut, partition
from fedjax_bn.tree import flatten, take_client

C, B = 3, 8
SIZES = (5, 8, 7)
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)


class HeadNet(nn.Module):
    """body (dense) -> bn -> conv_bn2 (dense) -> head: names for matching by components."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = nn.Dense(4, name="body")(x.reshape((x.shape[0], -1)))
        bn_mask = None if mask is None else mask[:, None]
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x, mask=bn_mask)
        x = nn.relu(nn.Dense(4, name="conv_bn2")(x))
        return nn.Dense(3, name="head")(x)


class Linear(nn.Module):
    """``y = head * body * x``: two scalars, for hand-checked FedRep phases."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = nn.Dense(1, use_bias=False, name="body")(x)
        return nn.Dense(1, use_bias=False, name="head")(x)


def half_squared(out_B1: jax.Array, y_B1: jax.Array) -> jax.Array:
    return 0.5 * jnp.sum(jnp.square(out_B1 - y_B1), axis=-1)


MODEL = HeadNet()


def module_paths(tree: Any) -> set[tuple[str, ...]]:
    return {p[1:-1] for p in flatten(tree)}


def has_module(tree: Any, name: str) -> bool:
    """Whether any leaf of ``tree`` (dicts, NamedTuples) lies under a key ``name``."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return any(name in [getattr(k, "key", None) for k in kp] for kp, _ in paths)


@functools.cache
def algorithm(name: str) -> fb.Algorithm:
    build = {
        "fedper": lambda: fb.fedper(MODEL, sgd(), head=("head",)),
        "fedper_fedbn": lambda: fb.fedper(MODEL, sgd(), head=("head",), policy="fedbn"),
        "lg_fedavg": lambda: fb.lg_fedavg(MODEL, sgd(), head=("head",)),
        "fedrep": lambda: fb.fedrep(MODEL, sgd(), head=("head",), head_steps=1),
        "ditto": lambda: fb.ditto(MODEL, sgd(), lam=1.0),
        "ditto0": lambda: fb.ditto(MODEL, sgd(), lam=0.0),
    }
    return build[name]()


@functools.cache
def rounds(name: str, cohort: int | None = None) -> Any:
    return fb.make_round(
        algorithm(name), executor="sequential", batch_size=B, local_epochs=2, cohort_size=cohort
    )


def train(name: str, num_rounds: int, seed: int = 0, cohort: int | None = None) -> Any:
    data = make_clients(seed, SIZES)
    state = algorithm(name).init(jax.random.key(seed), SAMPLE_X, C)
    states = [state]
    for r in range(num_rounds):
        state, _ = rounds(name, cohort)(state, data, jax.random.key(100 + r))
        states.append(state)
    return states, data


def init_vars() -> dict[str, Any]:
    return dict(jax.eval_shape(lambda k: MODEL.init(k, SAMPLE_X, train=False), jax.random.key(0)))


# --- local= by module path components -------------------------------------------------------


def test_names_match_whole_path_components_never_substrings() -> None:
    variables = init_vars()
    parts = partition(variables, "fedavg", ("bn",))
    assert module_paths(parts.local) == {("bn",)}  # params and batch_stats of bn only
    assert has_module(parts.shared, "conv_bn2") and not has_module(parts.shared, "bn")
    assert not has_module(parts.pooled, "bn")
    body = partition(variables, "fedavg", AllBut(("head",)))
    assert module_paths(body.shared) == {("head",)}
    assert module_paths(body.local) == {("body",), ("bn",), ("conv_bn2",)}
    pred = partition(variables, "fedavg", lambda m: m[-1].startswith("conv"))
    assert module_paths(pred.local) == {("conv_bn2",)}


def test_default_local_is_the_policy_alone() -> None:
    variables = init_vars()
    for policy in ("fedavg", "fedbn", "silobn"):
        assert partition(variables, policy, ()) == partition(variables, policy)


def test_unknown_name_is_an_error_listing_top_level_modules() -> None:
    with pytest.raises(ValueError, match=r"\['conv'\].*bn, body, conv_bn2, head"):
        partition(init_vars(), "fedavg", ("head", "conv"))
    with pytest.raises(ValueError, match="predicate matches no module"):
        partition(init_vars(), "fedavg", lambda m: False)
    with pytest.raises(ValueError, match="bn, body, conv_bn2, head"):
        fb.fedper(MODEL, sgd(), head=("Dense_1",)).init(jax.random.key(0), SAMPLE_X, C)


def test_fedbn_with_local_head_keeps_both_local() -> None:
    parts = partition(init_vars(), "fedbn", ("head",))
    assert module_paths(parts.local) == {("bn",), ("head",)}
    assert module_paths(parts.shared) == {("body",), ("conv_bn2",)} and not parts.pooled


# --- FedPer / LG-FedAvg through the executors ------------------------------------------------


@pytest.mark.parametrize("name", ["fedper", "fedper_fedbn"])
def test_fedper_head_never_leaves_the_client(name: str) -> None:
    states, data = train(name, 2)
    alg = algorithm(name)
    for state in states:
        assert not has_module(state.server, "head")
    carry = alg.client_init(states[1].server, take_client(states[1].clients, 0))
    message, client, _ = alg.client_final(carry)
    assert not has_module(message, "head") and has_module(client.local, "head")
    heads = [np.asarray(states[-1].clients.local["params"]["head"]["kernel"][c]) for c in range(C)]
    assert not np.allclose(heads[0], heads[1])  # each client trained its own head
    assert fb.global_variables(alg, states[-1], data.n) is None  # no global head


def unchanged(before: Any, after: Any, c: int) -> bool:
    """Whether client ``c``'s rows are bitwise the same in two stacked client trees."""
    pairs = zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
    return all(np.array_equal(a[c], b[c]) for a, b in pairs)


def test_fedper_sitting_out_clients_are_bitwise_unchanged() -> None:
    states, _ = train("fedper", 1, cohort=1)
    before, after = states
    # the one sampled client changed; the others sat out and are the same, bit for bit
    assert sum(unchanged(before.clients, after.clients, c) for c in range(C)) == C - 1


def test_lg_fedavg_shares_only_the_head() -> None:
    states, _ = train("lg_fedavg", 1)
    assert module_paths(states[-1].server.shared) == {("head",)}
    assert module_paths(states[-1].clients.local) == {("body",), ("bn",), ("conv_bn2",)}


# --- FedRep: head phase, then body phase (hand-checked on y = h * b * x) ---------------------


def test_fedrep_phases_freeze_the_other_part_hand_check() -> None:
    lr = 0.1
    alg = fb.fedrep(Linear(), optax.sgd(lr), head=("head",), head_steps=1, loss=half_squared)
    state = alg.init(jax.random.key(3), jnp.zeros((1, 1)), 1)
    x = np.array([[1.0], [2.0], [-1.0]], np.float32)
    y = np.array([[0.5], [3.0], [1.0]], np.float32)
    batch = client_lib.Batch(jnp.asarray(x), jnp.asarray(y))
    carry = alg.client_init(state.server, take_client(state.clients, 0))

    def scalars(carry: Any) -> tuple[float, float]:
        p = carry.local.variables["params"]
        return float(p["body"]["kernel"][0, 0]), float(p["head"]["kernel"][0, 0])

    b0, h0 = scalars(carry)
    carry = alg.client_step(carry, batch)  # step 1: head phase
    b1, h1 = scalars(carry)
    r = h0 * b0 * x - y
    assert b1 == b0
    np.testing.assert_allclose(h1, h0 - lr * np.mean(r * b0 * x), rtol=1e-5)
    carry = alg.client_step(carry, batch)  # step 2: body phase
    b2, h2 = scalars(carry)
    r = h1 * b1 * x - y
    assert h2 == h1
    np.testing.assert_allclose(b2, b1 - lr * np.mean(r * h1 * x), rtol=1e-5)
    message, client, _ = alg.client_final(carry)
    assert module_paths(message.shared) == {("body",)}
    assert module_paths(client.local) == {("head",)}


def test_fedrep_keeps_frozen_bn_statistics() -> None:
    alg = algorithm("fedrep")
    state = alg.init(jax.random.key(0), SAMPLE_X, C)
    data = make_clients(1, SIZES)
    carry = alg.client_init(state.server, take_client(state.clients, 1))
    start = carry.local.variables
    carry = alg.client_step(carry, client_lib.Batch(data.x[1], data.y[1]))  # head phase
    assert_trees_equal(carry.local.variables["batch_stats"], start["batch_stats"])
    for module in ("body", "bn", "conv_bn2"):
        assert_trees_equal(carry.local.variables["params"][module], start["params"][module])


# --- Ditto -----------------------------------------------------------------------------------


def test_ditto_lambda_zero_is_local_training_alone() -> None:
    alg = algorithm("ditto0")
    states, data = train("ditto0", 2)
    # Round 1 starts the personal model at the global one: it is the FedAvg client's model.
    # Round 2 starts it from itself: it is that model trained on, never pulled back.
    for c in range(C):
        personal = take_client(states[2].clients.personal, c)
        once = take_client(states[1].clients.personal, c)
        assert not np.allclose(  # round 2's global differs from client c's round-1 model
            np.asarray(states[1].server.shared["params"]["head"]["kernel"]),
            np.asarray(once["params"]["head"]["kernel"]),
        )
        ref = client_lib.init_state(alg.local, once)
        idx, mask = fb.execution.round_batches(jax.random.key(101), data.n, max(SIZES), B, 2)
        for s in range(idx.shape[1]):
            i, m = idx[c, s], mask[c, s]
            batch = client_lib.Batch(data.x[c][i], data.y[c][i], m)
            ref = client_lib.train_step(alg.local, None, ref, batch)
        assert_trees_close(personal, ref.variables, rtol=1e-5, atol=1e-6)


def test_ditto_large_lambda_holds_personal_at_the_round_global() -> None:
    lam = 1e3  # personal lr 1/lam: each step lands on w - grad/lam
    alg = fb.ditto(MODEL, optax.sgd(0.5), lam=lam, personal_tx=optax.sgd(1.0 / lam))
    data = make_clients(2, SIZES)
    state = alg.init(jax.random.key(0), SAMPLE_X, C)
    rnd = fb.make_round(alg, executor="sequential", batch_size=B, local_epochs=1)
    state, _ = rnd(state, data, jax.random.key(1))
    anchor = state.server.shared["params"]  # round 2's global shared params
    first = state.clients.personal["params"]
    state, _ = rnd(state, data, jax.random.key(2))
    flat_v, flat_v0 = flatten(state.clients.personal["params"]), flatten(first)
    moved = max(np.max(np.abs(flat_v0[p] - w)) for p, w in flatten(anchor).items())
    off = max(np.max(np.abs(flat_v[p] - w)) for p, w in flatten(anchor).items())
    assert moved > 1e-2  # the global really moved away from round 1's personal models
    assert off < 0.05 * moved  # and the personal models followed it


def test_ditto_personal_state_persists_when_sitting_out() -> None:
    states, _ = train("ditto", 2, cohort=1)
    for before, after in zip(states, states[1:], strict=False):
        same = [unchanged(before.clients, after.clients, c) for c in range(C)]
        assert sum(same) == C - 1
    assert np.asarray(states[-1].clients.rounds).max() >= 1


# --- evaluation ------------------------------------------------------------------------------


def federated(seed: int) -> FederatedData:
    return FederatedData(make_clients(seed, SIZES), make_clients(seed + 7, SIZES), 3)


def test_evaluate_ditto_personal_global_and_never_trained_fallback() -> None:
    alg = algorithm("ditto")
    states, _ = train("ditto", 1, cohort=2)
    state, data = states[-1], federated(0)
    rounds_C = np.asarray(state.clients.rounds)
    trained, fresh = int(np.flatnonzero(rounds_C)[0]), int(np.flatnonzero(rounds_C == 0)[0])
    personal = fb.evaluate_clients(alg, state, data)
    glob = fb.evaluate_clients(alg, state, data, personal=False)
    x, y = data.test.client(trained)
    own = evaluate_model(alg.task, take_client(state.clients.personal, trained), x, y)
    assert personal.loss[trained] == own.loss
    assert personal.loss[fresh] == glob.loss[fresh]  # never trained: the global model
    assert personal.loss[trained] != glob.loss[trained]
    assert fb.evaluate_global(alg, state, data) is not None


def test_fedper_fallback_is_the_averaged_head() -> None:
    alg = algorithm("fedper")
    states, _ = train("fedper", 1)
    state, data = states[-1], federated(0)
    model = fallback_model(alg, state, data.train.n)
    w = np.asarray(data.train.n, np.float64) / np.sum(data.train.n)
    heads = np.asarray(state.clients.local["params"]["head"]["kernel"], np.float64)
    want = np.tensordot(w, heads, axes=1)
    np.testing.assert_allclose(model["params"]["head"]["kernel"], want, rtol=1e-5, atol=1e-6)
    assert_trees_equal(model["params"]["body"], state.server.shared["params"]["body"])
    result = fb.evaluate_clients(alg, state, data, fallback=[1])
    x, y = data.test.client(1)
    assert result.loss[1] == evaluate_model(alg.task, model, x, y).loss
    assert result.loss[0] == fb.evaluate_clients(alg, state, data).loss[0]


# --- registry and config ---------------------------------------------------------------------


def test_personalization_config_builds_every_algorithm_on_its_model() -> None:
    from experiments import registry
    from experiments.configs import personalization

    config = personalization.get_config()
    config.model.widths, config.model.hidden = (4,), 8
    model = registry.build_model(config, 3)
    for name in registry.names(config.algorithms):
        alg = registry.build_algorithm(name, model, sgd(), config)
        state = jax.eval_shape(lambda k, a=alg: a.init(k, SAMPLE_X, C), jax.random.key(0))
        personal_head = has_module(state.clients, config.head)
        assert personal_head == (name in ("fedper", "fedper_fedbn", "fedrep", "ditto"))
        assert has_module(state.server, config.head) == (
            name not in ("fedper", "fedper_fedbn", "fedrep")
        )
    config.head = "Dense"  # a substring of Dense_0 and Dense_1, no component: an error
    with pytest.raises(ValueError, match="ConvBNReLU_0, Dense_0, Dense_1"):
        alg = registry.build_algorithm("fedper", model, sgd(), config)
        jax.eval_shape(lambda k: alg.init(k, SAMPLE_X, C), jax.random.key(0))
