"""Hyperparameters as data (``fedjax_bn/hyper.py``): a sweep compiles every program once, and
each of its runs equals the run built with that value as a constant, bitwise (the traced value
enters the same arithmetic: ``-lr * u``, ``mu * prox``, ``max_norm / norm``)."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import IMAGE_SHAPE, CounterModel, assert_trees_equal, make_clients

import fedjax_bn as fb
from experiments.registry import coupled_adam
from fedjax_bn.privacy import gaussian

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = {"n": 0}
_lock = threading.Lock()


def _count(event: str, duration: float, **kw: Any) -> None:
    if event == COMPILE_EVENT:
        with _lock:
            _compiles["n"] += 1


jax.monitoring.register_event_duration_secs_listener(_count)

LRS = (1e-3, 5e-3, 2e-2)
MUS = (1e-3, 1e-2, 1e-1)
SIZES = (5, 9, 3)
ROUNDS = 2


def sample_x() -> jax.Array:
    return jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)


def run(alg: fb.Algorithm, state: Any, round_fn: Any) -> tuple[Any, list[Any]]:
    """``ROUNDS`` rounds from ``state`` with fixed keys: the final state and each round's loss."""
    train, losses = make_clients(0, SIZES), []
    for r in range(ROUNDS):
        state, result = round_fn(state, train, jax.random.key(r))
        losses.append(result.loss)
    return state, losses


def model_of(state: Any) -> Any:
    """What the run learned: the global model parts and the clients' local ones."""
    return state.server.shared, state.server.pooled, state.clients.local


def adam_prox(lr: float, mu: float, injected: bool, **kw: Any) -> fb.Algorithm:
    """FedProx with Adam + coupled L2, its lr (and weight decay) data when ``injected``."""
    tx = optax.inject_hyperparams(coupled_adam)(lr, 1e-4) if injected else coupled_adam(lr, 1e-4)
    return fb.fedprox(CounterModel(), tx, mu, **kw)


@pytest.mark.parametrize("executor", ["sequential", "vmap"])
def test_lr_mu_sweep_compiles_each_program_once(executor: str) -> None:
    """Nine (lr, mu) settings through one algorithm and one round function: every program
    compiles during the first setting's rounds, none during the other eight."""
    alg = adam_prox(LRS[0], MUS[0], injected=True)
    round_fn = fb.make_round(alg, executor=executor, batch_size=4)
    start = alg.init(jax.random.key(0), sample_x(), len(SIZES))
    per_setting = []
    for lr, mu in itertools.product(LRS, MUS):
        before = _compiles["n"]
        state = fb.with_hyperparams(start, {"client.learning_rate": lr, "mu": mu})
        jax.block_until_ready(run(alg, state, round_fn))
        per_setting.append(_compiles["n"] - before)
    assert per_setting[0] > 0  # the listener sees compilations at all
    assert per_setting[1:] == [0] * 8


def test_lr_mu_sweep_equals_constant_runs() -> None:
    """Each setting of the sweep ends bitwise where the algorithm built with that lr and mu as
    constants ends (model and every round's losses)."""
    alg = adam_prox(LRS[0], MUS[0], injected=True)
    round_fn = fb.make_round(alg, executor="vmap", batch_size=4)
    start = alg.init(jax.random.key(0), sample_x(), len(SIZES))
    for lr, mu in [(LRS[0], MUS[0]), (LRS[1], MUS[2]), (LRS[2], MUS[1])]:
        state = fb.with_hyperparams(start, {"client.learning_rate": lr, "mu": mu})
        swept, swept_losses = run(alg, state, round_fn)
        const = adam_prox(lr, mu, injected=False)
        ref, ref_losses = run(
            const,
            const.init(jax.random.key(0), sample_x(), len(SIZES)),
            fb.make_round(const, executor="vmap", batch_size=4),
        )
        assert_trees_equal(model_of(swept), model_of(ref))
        assert_trees_equal(swept_losses, ref_losses)
        assert float(fb.hyperparams(swept)["mu"]) == pytest.approx(mu)


@pytest.mark.parametrize(
    ("factory", "values"),
    [
        (lambda v, **kw: fb.fedadam(CounterModel(), optax.sgd(0.05), server_lr=v, **kw), "lr"),
        (
            lambda v, **kw: fb.fedavgm(CounterModel(), optax.sgd(0.05), momentum=v, **kw),
            "momentum",
        ),
        (lambda v, **kw: fb.fedavg(CounterModel(), optax.sgd(0.05), clip_norm=v, **kw), "clip"),
        (lambda v, **kw: fb.fedavg(CounterModel(), optax.sgd(0.05), dp=gaussian(v, 0.5)), "z"),
        (
            lambda v, **kw: fb.fedavg(CounterModel(), optax.sgd(0.05), dp=gaussian(0.3, v)),
            "dp_clip",
        ),
    ],
)
def test_server_side_values_as_data_equal_constants(factory: Any, values: str) -> None:
    """Server learning rate, FedAvgM momentum, clip norm and DP-FedAvg's noise multiplier and
    clip set as data give the run built with the value as a constant, bitwise, through the
    program compiled for the first value."""
    name, grid = {
        "lr": ("server.learning_rate", (1e-2, 3e-2)),
        "momentum": ("server.momentum", (0.9, 0.5)),
        "clip": ("clip_norm", (1.0, 0.05)),
        "z": ("dp.noise_multiplier", (0.3, 1.1)),
        "dp_clip": ("dp.clip_norm", (0.5, 0.07)),
    }[values]
    alg = factory(grid[0])
    round_fn = fb.make_round(alg, executor="vmap", batch_size=4)
    start = alg.init(jax.random.key(0), sample_x(), len(SIZES))
    run(alg, start, round_fn)  # compiles
    before = _compiles["n"]
    swept, _ = run(alg, fb.with_hyperparams(start, {name: grid[1]}), round_fn)
    assert _compiles["n"] == before
    const = factory(grid[1])
    ref, _ = run(
        const,
        const.init(jax.random.key(0), sample_x(), len(SIZES)),
        fb.make_round(const, executor="vmap", batch_size=4),
    )
    assert_trees_equal(model_of(swept), model_of(ref))
    if values.startswith(("z", "dp")):  # the adaptive clip's state as well
        assert_trees_equal(swept.server.dp, ref.server.dp)


def test_persistent_client_optimizer_takes_the_server_values() -> None:
    """With a client optimizer kept across rounds, its lr is still the state's: the sweep's
    run equals the constant one."""
    alg = adam_prox(LRS[0], MUS[0], injected=True, persist_client_optimizer=True)
    round_fn = fb.make_round(alg, executor="vmap", batch_size=4)
    start = alg.init(jax.random.key(0), sample_x(), len(SIZES))
    swept, _ = run(alg, fb.with_hyperparams(start, {"client.learning_rate": LRS[2]}), round_fn)
    const = adam_prox(LRS[2], MUS[0], injected=True, persist_client_optimizer=True)
    ref, _ = run(
        const,
        const.init(jax.random.key(0), sample_x(), len(SIZES)),
        fb.make_round(const, executor="vmap", batch_size=4),
    )
    assert_trees_equal(model_of(swept), model_of(ref))


def test_what_is_data() -> None:
    """Only what is on and injectable is data; nothing at all for plain FedAvg (its state is
    as it was)."""
    plain = fb.fedavg(CounterModel(), optax.sgd(0.1))
    assert plain.init(jax.random.key(0), sample_x(), 2).server.hyper is None
    dp = fb.fedavg(CounterModel(), optax.sgd(0.1), dp=gaussian(0.7, 0.5))
    assert sorted(fb.hyperparams(dp.init(jax.random.key(0), sample_x(), 2))) == [
        "dp.clip_norm",
        "dp.noise_multiplier",
    ]
    adaptive = fb.fedavg(CounterModel(), optax.sgd(0.1), dp=gaussian(0.7, 0.5, target_quantile=0.5))
    assert list(fb.hyperparams(adaptive.init(jax.random.key(0), sample_x(), 2))) == ["dp.clip_norm"]
    alg = adam_prox(0.1, 0.5, injected=True, clip_norm=2.0)
    got = fb.hyperparams(alg.init(jax.random.key(0), sample_x(), 2))
    want = {"mu": 0.5, "clip_norm": 2.0, "client.learning_rate": 0.1, "client.weight_decay": 1e-4}
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert got[k].dtype == jnp.float32 and float(got[k]) == pytest.approx(v)


def test_bad_values_are_refused() -> None:
    """An unknown name lists the valid ones; a negative mu or a zero clip norm is refused."""
    alg = adam_prox(0.1, 0.5, injected=False, clip_norm=2.0)
    state = alg.init(jax.random.key(0), sample_x(), 2)
    with pytest.raises(ValueError, match="this state's are: clip_norm, mu"):
        fb.with_hyperparams(state, {"client.learning_rate": 0.1})
    with pytest.raises(ValueError, match="mu must be >= 0"):
        fb.with_hyperparams(state, {"mu": -1.0})
    with pytest.raises(ValueError, match="clip_norm must be > 0"):
        fb.with_hyperparams(state, {"clip_norm": 0.0})


@pytest.mark.parametrize("which", ["fedrep_mu", "ditto_lr"])
def test_personalized_algorithms_follow_the_state_values(which: str) -> None:
    """FedRep's own client step takes the state's mu; Ditto's personal model (same client_tx)
    the state's learning rate: a swept run equals the run built with the value."""

    def build(lr: float, mu: float) -> fb.Algorithm:
        tx = optax.inject_hyperparams(coupled_adam)(lr, 1e-4)
        if which == "fedrep_mu":
            return fb.fedrep(CounterModel(), tx, head=("Dense_1",), head_steps=1, mu=mu)
        return fb.ditto(CounterModel(), tx, lam=0.1)

    name, (first, second) = {
        "fedrep_mu": ("mu", (MUS[0], MUS[2])),
        "ditto_lr": ("client.learning_rate", (LRS[0], LRS[2])),
    }[which]
    args = (LRS[0], second) if name == "mu" else (second, MUS[0])
    alg = build(LRS[0], first)
    start = alg.init(jax.random.key(0), sample_x(), len(SIZES))
    round_fn = fb.make_round(alg, executor="vmap", batch_size=4)
    swept, _ = run(alg, fb.with_hyperparams(start, {name: second}), round_fn)
    const = build(*args)
    ref, _ = run(
        const,
        const.init(jax.random.key(0), sample_x(), len(SIZES)),
        fb.make_round(const, executor="vmap", batch_size=4),
    )
    assert_trees_equal(swept.server, ref.server)
    assert_trees_equal(swept.clients, ref.clients)
