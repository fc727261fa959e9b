"""Tests for per-client budgets of local steps (``fedjax_bn.budgets``) and FedNova.

Budgets: masked steps in the lockstep executors equal skipped calls in ``sequential``; a
budget at least a client's real steps changes nothing; budget 0 is a client with no data;
cohort rounds read budgets per population id. FedNova: equal steps give FedAvg; unequal steps
give the paper's formula, checked against a numpy softmax regression, and down-weight the
client that did more steps.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CounterModel, assert_trees_close, assert_trees_equal, make_clients

import fedjax_bn as fb
from fedjax_bn import budgets
from fedjax_bn.aggregate import normalized_mean, weighted_mean
from fedjax_bn.execution import batches_from_order, make_round, schedule
from fedjax_bn.execution.batches import budget_mask
from fedjax_bn.execution.plan import truncate
from fedjax_bn.execution.streams import BUDGET_STREAM

SIZES = (5, 10, 3)  # real steps per epoch with B=4: 2, 3, 1
B, EPOCHS = 4, 2


class Linear(nn.Module):
    """Softmax regression without bias: its SGD steps are easy to write down in numpy."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        return nn.Dense(3, use_bias=False)(x.reshape((x.shape[0], -1)))


def fedbn() -> fb.Algorithm:
    """FedBN with a persistent momentum optimizer: local leaves and client state go through."""
    return fb.fedbn(CounterModel(), optax.sgd(0.05, momentum=0.9), persist_client_optimizer=True)


def linear() -> fb.Algorithm:
    """FedAvg of a softmax regression (cheap to compile) with persistent client optimizers."""
    return fb.fedavg(Linear(), optax.sgd(0.05, momentum=0.9), persist_client_optimizer=True)


def seen(n: int, budget: int | None) -> int:
    """Examples a size-``n`` client sees in its first ``budget`` real steps (layout order)."""
    per_epoch = [B] * (n // B) + ([n % B] if n % B else [])
    return sum((per_epoch * EPOCHS)[:budget])


def run(alg: fb.Algorithm, data: Any, rounds: int = 1, **options: Any) -> tuple[Any, Any]:
    """``rounds`` rounds from the same start; returns (state, last result)."""
    rnd = make_round(alg, batch_size=B, local_epochs=EPOCHS, **options)
    state = alg.init(jax.random.key(0), data.x[0, :1], int(data.n.shape[0]))
    result = None
    for r in range(rounds):
        state, result = rnd(state, data, jax.random.key(10 + r))
    return state, result


# ------------------------------------------------------------------------------ budget helpers


def test_check_budget_rejects_bad_budgets() -> None:
    with pytest.raises(ValueError, match=">= 0"):
        budgets.fixed([1, -1])
    with pytest.raises(ValueError, match="1-D"):
        budgets.fixed([[1, 2]])
    with pytest.raises(ValueError, match="whole numbers"):
        budgets.fixed([1.5, 2])
    with pytest.raises(ValueError, match="one entry per client"):
        budgets.check_budget(np.array([1, 2]), 3)
    with pytest.raises(ValueError, match="low <= high"):
        budgets.uniform_steps(3, 1)
    with pytest.raises(ValueError, match="low <= high"):
        budgets.uniform_steps(-1, 1)
    np.testing.assert_array_equal(budgets.check_budget([2.0, 1e12], 2), [2, budgets.UNLIMITED])


def test_round_rejects_a_budget_of_the_wrong_length_or_sign() -> None:
    alg, data = fedbn(), make_clients(0, SIZES)
    state = alg.init(jax.random.key(0), data.x[0, :1], len(SIZES))
    rnd = make_round(alg, executor="sequential", batch_size=B, budget=[1, 2])
    with pytest.raises(ValueError, match="one entry per client"):
        rnd(state, data, jax.random.key(1))
    negative = make_round(
        alg, executor="sequential", batch_size=B, budget=lambda k, r, c: -jnp.ones(c, jnp.int32)
    )
    with pytest.raises(ValueError, match=">= 0"):
        negative(state, data, jax.random.key(1))


def test_uniform_steps_is_a_pure_draw_in_range() -> None:
    draw = budgets.uniform_steps(2, 5)
    key = jax.random.key(3)
    a, b, c = (np.asarray(draw(key, r, 64)) for r in (0, 0, 1))
    assert a.shape == (64,) and a.min() >= 2 and a.max() <= 5
    assert set(a.tolist()) == {2, 3, 4, 5}
    np.testing.assert_array_equal(a, b)
    assert np.any(a != c)


def test_budget_mask_keeps_the_first_real_steps() -> None:
    # Client 0: real steps 0, 1 and 3 (step 2 is padding); client 1: real steps 0..3.
    real = np.array([[1, 1, 0, 1], [1, 1, 1, 1]], bool)
    mask = jnp.asarray(np.repeat(real[..., None], 2, axis=-1))
    out = np.asarray(budget_mask(mask, jnp.array([2, 0])))
    np.testing.assert_array_equal(out[0, :, 0], [1, 1, 0, 0])
    np.testing.assert_array_equal(out[1], np.zeros((4, 2), bool))
    out = np.asarray(budget_mask(mask, jnp.array([3, 99])))
    np.testing.assert_array_equal(out, np.asarray(mask))


@pytest.mark.parametrize("per_call", [1, 2, 3])
def test_schedule_truncated_to_the_budget(per_call: int) -> None:
    for n in (0, 3, 4, 9, 12):
        full = schedule(n, 12, B, EPOCHS, per_call)
        total = sum(num for _, num, _ in full)
        for budget in range(total + 2):
            cut = schedule(n, 12, B, EPOCHS, per_call, budget)
            assert sum(num for _, num, _ in cut) == min(budget, total)
            # The same steps in the same order, a prefix of the full schedule's steps.
            steps = [s + i for s, num, _ in full for i in range(num)]
            assert [s + i for s, num, _ in cut for i in range(num)] == steps[:budget]
    with pytest.raises(ValueError, match=">= 0"):
        truncate([(0, 1, False)], -1)


# ------------------------------------------------------------------------- budgets in rounds


@pytest.mark.parametrize("executor", ["sequential", "vmap"])
def test_a_budget_above_the_real_steps_changes_nothing(executor: str) -> None:
    data = make_clients(0, SIZES)
    want = run(linear(), data, executor=executor)
    got = run(linear(), data, executor=executor, budget=[4, 6, 100])
    if executor == "sequential":  # the same calls run: bit for bit
        assert_trees_equal(got, want)
    else:  # every step masked now (no unmasked full steps): equal up to float rounding
        assert_trees_close(got, want, rtol=1e-5, atol=1e-6)


def test_budgets_drawn_per_round_agree_across_executors() -> None:
    data = make_clients(1, SIZES)
    draw = budgets.uniform_steps(0, 5)
    outs = [
        run(fedbn(), data, 2, executor="sequential", budget=draw),
        run(fedbn(), data, 2, executor="sequential", budget=draw, steps_per_call=2),
        run(fedbn(), data, 2, executor="chunked", budget=draw, chunk_size=2, num_groups=2),
    ]
    key = jax.random.fold_in(jax.random.key(11), BUDGET_STREAM)
    drawn = np.asarray(draw(key, 1, len(SIZES)))
    want = [seen(n, b) for n, b in zip(SIZES, drawn, strict=True)]
    np.testing.assert_array_equal(outs[0][1].num_seen, want)
    for got in outs[1:]:
        assert_trees_close(got, outs[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("executor", ["sequential", "vmap"])
def test_budget_zero_is_a_client_with_no_data(executor: str) -> None:
    with_data = make_clients(2, SIZES)
    without = with_data.replace(n=jnp.asarray((0,) + SIZES[1:], jnp.int32))
    got = run(linear(), with_data, executor=executor, budget=[0, 100, 100])
    want = run(linear(), without, executor=executor)
    assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    assert int(got[1].num_seen[0]) == 0
    start = linear().init(jax.random.key(0), with_data.x[0, :1], len(SIZES))
    assert_trees_equal(
        jax.tree.map(lambda a: a[0], got[0].clients), jax.tree.map(lambda a: a[0], start.clients)
    )


def test_cohort_budgets_are_per_population_id() -> None:
    sizes = (5, 10, 3, 8)
    data = make_clients(3, sizes)
    budget = [1, 2, 0, 3]
    outs = [
        run(linear(), data, 2, executor=ex, cohort_size=2, budget=budget)
        for ex in ("sequential", "vmap")
    ]
    for _, result in outs:
        ids = np.asarray(result.clients)
        want = [seen(sizes[i], budget[i]) for i in ids]
        np.testing.assert_array_equal(result.num_seen, want)
    assert_trees_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- FedNova


def test_normalized_mean_hand_case() -> None:
    server = {"w": jnp.zeros(2, jnp.float32), "count": jnp.asarray(7, jnp.int32)}
    y = np.array([[2.0, 4.0], [3.0, 3.0], [50.0, -50.0]], np.float32)
    stacked = {"w": jnp.asarray(y), "count": jnp.asarray([1, 2, 3], jnp.int32)}
    weights, tau = np.array([1.0, 3.0, 0.0]), np.array([2, 1, 0])
    # A third client with no steps and no weight: ignored, no NaN from 0 / 0.
    out = normalized_mean(stacked, jnp.asarray(weights), jnp.asarray(tau), server)
    p = weights / weights.sum()
    d = -y[:2] / tau[:2, None]  # (x - y_c) / tau_c, x = 0
    tau_eff = (p * tau).sum()
    np.testing.assert_allclose(out["w"], -tau_eff * (p[:2, None] * d).sum(0), rtol=1e-6)
    assert out["count"].dtype == jnp.int32 and int(out["count"]) == 7
    # Equal steps: FedAvg's weighted mean.
    same = normalized_mean(stacked, jnp.asarray(weights), jnp.asarray([3, 3, 3]), server)
    assert_trees_close(same, weighted_mean(stacked, jnp.asarray(weights), server))


def test_fednova_with_equal_steps_equals_fedavg() -> None:
    data = make_clients(4, (5, 10, 12))  # 2, 3, 3 real steps per epoch: capped to 3 in all
    opts = {"executor": "sequential", "budget": [3, 3, 3]}
    nova = run(fb.fednova(CounterModel(), optax.sgd(0.1)), data, **opts)
    avg = run(fb.fedavg(CounterModel(), optax.sgd(0.1)), data, **opts)
    assert_trees_close(nova[0].server, avg[0].server, rtol=1e-5, atol=1e-6)
    no_bytes = {"uplink_bytes": None, "downlink_bytes": None}  # FedNova also sends its steps
    assert_trees_close(nova[1]._replace(**no_bytes), avg[1]._replace(**no_bytes))


def numpy_sgd(w: np.ndarray, x: np.ndarray, y: np.ndarray, lr: float) -> np.ndarray:
    """Full-batch-by-batch SGD on mean softmax cross-entropy, batches of B in order."""
    for s in range(0, len(y), B):
        xb, yb = x[s : s + B].reshape(-1, w.shape[0]), y[s : s + B]
        logits = xb @ w
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(yb)), yb] -= 1.0
        w = w - lr * xb.T @ p / len(yb)
    return w


def test_fednova_two_clients_matches_numpy() -> None:
    sizes, lr = (4, 12), 0.1  # one and three SGD steps
    data = make_clients(5, sizes)
    alg = fb.fednova(Linear(), optax.sgd(lr))
    state = alg.init(jax.random.key(0), data.x[0, :1], 2)
    orders = [[np.arange(n)] for n in sizes]
    batches = batches_from_order(orders, int(data.y.shape[1]), B)
    rnd = make_round(alg, executor="sequential", batch_size=B)
    new, _ = rnd(state, data, jax.random.key(1), batches)
    x = np.asarray(state.server.shared["params"]["Dense_0"]["kernel"], np.float64)
    xs, ys = np.asarray(data.x, np.float64), np.asarray(data.y)
    y = [numpy_sgd(x, xs[c, :n], ys[c, :n], lr) for c, n in enumerate(sizes)]
    p, tau = np.array(sizes) / sum(sizes), np.array([1.0, 3.0])
    tau_eff = (p * tau).sum()
    want = x - tau_eff * sum(p[c] * (x - y[c]) / tau[c] for c in range(2))
    got = np.asarray(new.server.shared["params"]["Dense_0"]["kernel"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    fedavg_w = sum(p[c] * y[c] for c in range(2))
    assert not np.allclose(got, fedavg_w, rtol=1e-4, atol=1e-6)


def shared_params(state: Any) -> np.ndarray:
    """The global model's params, flattened into one vector."""
    leaves = jax.tree.leaves(state.server.shared["params"])
    return np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in leaves])


def test_fednova_down_weights_the_client_with_more_steps() -> None:
    data = make_clients(6, (8, 8))  # equal sizes (p = 1/2 each), 2 real steps per epoch
    tau = (1, 4)

    def server(factory: Any, budget: list[int]) -> np.ndarray:
        alg = factory(Linear(), optax.sgd(0.1))
        return shared_params(run(alg, data, executor="sequential", budget=budget)[0])

    x = shared_params(fb.fedavg(Linear(), optax.sgd(0.1)).init(jax.random.key(0), data.x[0, :1], 2))
    # Each client alone (the other's budget 0, so weight 0): the server becomes its model.
    deltas = np.stack([server(fb.fedavg, [tau[0], 0]), server(fb.fedavg, [0, tau[1]])]) - x

    def coefficients(new: np.ndarray) -> np.ndarray:
        coef, *_ = np.linalg.lstsq(deltas.T, new - x, rcond=None)
        return coef

    avg = coefficients(server(fb.fedavg, list(tau)))
    nova = coefficients(server(fb.fednova, list(tau)))
    np.testing.assert_allclose(avg, [0.5, 0.5], atol=1e-4)
    tau_eff = 0.5 * sum(tau)
    np.testing.assert_allclose(nova, [0.5 * tau_eff / t for t in tau], rtol=1e-3)
    assert nova[1] < avg[1] and nova[0] > avg[0]


def test_fednova_composes_with_server_tx() -> None:
    data = make_clients(7, SIZES)
    plain = run(fb.fednova(Linear(), optax.sgd(0.1)), data, executor="sequential")
    tx = run(
        fb.fednova(Linear(), optax.sgd(0.1), server_tx=optax.sgd(1.0)),
        data,
        executor="sequential",
    )
    assert_trees_close(tx[0].server.shared, plain[0].server.shared, rtol=1e-5, atol=1e-6)


def test_fednova_is_exported_registered_and_checked() -> None:
    from experiments.registry import ALGORITHMS

    assert "fednova" in ALGORITHMS and fb.fednova is fb.algorithms.fednova
    assert fb.fednova(CounterModel(), optax.sgd(0.1)).name == "fednova"
    with pytest.raises(ValueError, match="normalize"):
        fb.make_algorithm(CounterModel(), optax.sgd(0.1), policy="fedavg", normalize="nova")
