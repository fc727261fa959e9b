"""Tests for experiments/attacks.py: attackers drawn from the seed, each poisoning as stated
(honest slots bitwise untouched), label flipping, a median that resists what moves the mean,
and the runner's bad-value errors and attack records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SHAPE, NUM_CLASSES, CounterModel, make_clients, sgd
from test_runner import tiny_argv

import fedjax_bn as fb
from experiments import attacks, checks, registry, run, runner
from experiments.configs import robust
from fedjax_bn.algorithms.base import client_variables
from fedjax_bn.data import FederatedData
from fedjax_bn.policy import bn_moment_paths, float_leaves, partition, with_leaves
from fedjax_bn.tree import flatten, repeat_clients

MODEL = CounterModel()
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
C = 5
BAD = np.array([False, True, False, False, True])


def test_attackers_are_fixed_by_the_seed_and_change_with_it() -> None:
    draws = [attacks.choose_attackers(seed, 20, 0.2) for seed in range(6)]
    assert all(d.sum() == 4 for d in draws)
    np.testing.assert_array_equal(draws[0], attacks.choose_attackers(0, 20, 0.2))
    assert len({tuple(np.flatnonzero(d)) for d in draws}) > 1


@pytest.mark.parametrize(("fraction", "n", "want"), [(0.2, 10, 2), (0.3, 15, 5), (0.0, 10, 0)])
def test_number_of_attackers_rounds_half_up(fraction: float, n: int, want: int) -> None:
    assert attacks.num_attackers(fraction, n) == want


def stacked_messages(alg: fb.Algorithm, seed: int = 0) -> tuple[Any, Any]:
    """``(server, message)``: the server of ``alg`` and a stacked message whose float leaves
    are the server's plus noise (variances kept positive), the counter the server's."""
    state = alg.init(jax.random.key(0), SAMPLE_X, C)
    one = client_variables(state, 0)
    rng = np.random.default_rng(seed)

    def jitter(leaf: Any) -> Any:
        if jnp.issubdtype(leaf.dtype, jnp.integer):
            return leaf
        return jnp.abs(leaf + jnp.asarray(rng.normal(size=leaf.shape), leaf.dtype)) + 0.1

    parts = partition(jax.tree.map(jitter, repeat_clients(one, C)), "fedavg")
    return state.server, fb.algorithms.Message(parts.shared, parts.pooled)


def poison(kind: str, scale: float = 3.0) -> tuple[Any, Any, Any]:
    """``(server, sent, received)``: what the wrapped ``server_update`` hands the algorithm."""
    alg = fb.make_algorithm(MODEL, sgd(), policy="fedavg")
    folded = []  # what the algorithm's own server_update is handed
    spy = alg._replace(server_update=lambda server, msgs, w: folded.append(msgs) or server)
    server, msgs = stacked_messages(alg)
    keys = jax.vmap(lambda i: jax.random.key_data(jax.random.key(i)))(jnp.arange(C))
    wrapped = attacks.poisoned(spy, BAD, kind, scale)
    wrapped.server_update(server, attacks.Sent(msgs, keys), jnp.ones(C))
    return server, msgs, folded[-1]


def leaves_of(tree: Any) -> dict[Any, np.ndarray]:
    return {p: np.asarray(v) for p, v in flatten(tree).items()}


def test_sign_flip_negates_exactly_the_attackers_updates() -> None:
    server, sent, got = poison("sign_flip")
    for field in ("shared", "pooled"):
        old = leaves_of(getattr(server, field))
        variances = {v for _, v in bn_moment_paths(getattr(sent, field))}
        for path, new in leaves_of(getattr(got, field)).items():
            orig = leaves_of(getattr(sent, field))[path]
            np.testing.assert_array_equal(new[~BAD], orig[~BAD])  # honest: bitwise
            if np.issubdtype(new.dtype, np.integer):
                np.testing.assert_array_equal(new, orig)  # the BN counter is never touched
                continue
            flipped = old[path] - (orig[BAD] - old[path])
            want = np.abs(flipped) if path in variances else flipped
            np.testing.assert_allclose(new[BAD], want, rtol=1e-6, atol=1e-6)
    assert {v for _, v in bn_moment_paths(sent.pooled)}  # the model has BN statistics


def test_scale_multiplies_and_gaussian_replaces_the_attackers_updates() -> None:
    server, sent, scaled = poison("scale", scale=3.0)
    _, _, noised = poison("gaussian", scale=3.0)
    old, orig = float_leaves(server.shared), float_leaves(sent.shared)
    for path, new in float_leaves(scaled.shared).items():
        want = old[path] + 3.0 * (orig[path][BAD] - old[path])
        np.testing.assert_allclose(new[BAD], want, rtol=1e-5, atol=1e-5)
    noise = np.concatenate(
        [(np.asarray(v[BAD]) - old[p]).reshape(-1) for p, v in float_leaves(noised.shared).items()]
    )
    assert abs(noise.std() - 3.0) < 0.5 and abs(noise.mean()) < 0.5
    first = [np.asarray(v[BAD][0]) for v in float_leaves(noised.shared).values()]
    second = [np.asarray(v[BAD][1]) for v in float_leaves(noised.shared).values()]
    assert not all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    for path, new in float_leaves(noised.shared).items():
        np.testing.assert_array_equal(np.asarray(new[~BAD]), np.asarray(orig[path][~BAD]))


def test_label_flip_maps_labels_of_attackers_only() -> None:
    train = make_clients(0, (6, 3, 5, 4, 2), n_max=6)
    data = FederatedData(train=train, test=train, num_classes=NUM_CLASSES)
    out = attacks.flip_labels(data, BAD)
    y, got = np.asarray(train.y), np.asarray(out.train.y)
    for c, n in enumerate(np.asarray(train.n)):
        want = NUM_CLASSES - 1 - y[c, :n] if BAD[c] else y[c, :n]
        np.testing.assert_array_equal(got[c, :n], want)
        np.testing.assert_array_equal(got[c, n:], y[c, n:])  # padding untouched
    np.testing.assert_array_equal(np.asarray(out.test.y), y)  # test data untouched
    assert got.dtype == y.dtype


def server_after(aggregator: Any, kind: str) -> Any:
    """The server after two rounds of FedAvg on 7 clients, client 3 attacking (scale 50)."""
    alg = fb.make_algorithm(MODEL, sgd(), policy="fedavg", aggregator=aggregator)
    bad = np.arange(7) == 3
    alg = alg if kind == "none" else attacks.poisoned(alg, bad, kind, 50.0)
    train = make_clients(0, (8,) * 7)
    state = alg.init(jax.random.key(0), SAMPLE_X, 7)
    round_fn = fb.make_round(alg, executor="sequential", batch_size=4)
    for r in range(2):
        state = round_fn(state, train, jax.random.key(r))[0]
    return state.server


def test_an_overflowing_attack_is_dropped_like_a_non_finite_message() -> None:
    """Scale 1e39 overflows float32: the attacker's message is quarantined after the attack,
    so the server is the mean of the six honest clients, as if client 3 had no data."""
    alg = fb.make_algorithm(MODEL, sgd(), policy="fedavg")
    attacked = attacks.poisoned(alg, np.arange(7) == 3, "scale", 1e39)
    sizes = {"attacked": (8,) * 7, "absent": (8, 8, 8, 0, 8, 8, 8)}
    servers = {}
    for name, algorithm in (("attacked", attacked), ("absent", alg)):
        train = make_clients(0, sizes[name], n_max=8)  # the other clients' data are the same
        state = algorithm.init(jax.random.key(0), SAMPLE_X, 7)
        round_fn = fb.make_round(algorithm, executor="sequential", batch_size=4)
        for r in range(2):
            state, result = round_fn(state, train, jax.random.key(r))
        servers[name] = state.server
    got, want = float_leaves(servers["attacked"].shared), float_leaves(servers["absent"].shared)
    assert all(np.isfinite(v).all() for v in got.values())
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6)


def distance(a: Any, b: Any) -> float:
    la, lb = float_leaves(a), float_leaves(b)
    return float(np.sqrt(sum(np.sum(np.square(la[p] - lb[p])) for p in la)))


def test_median_stays_closer_to_the_clean_run_than_the_mean() -> None:
    clean = server_after(None, "none")
    mean, med = server_after(None, "scale"), server_after(fb.aggregators.median(), "scale")
    for field in ("shared", "pooled"):  # parameters and BN statistics alike
        d_mean = distance(getattr(mean, field), getattr(clean, field))
        d_med = distance(getattr(med, field), getattr(clean, field))
        assert d_med < d_mean / 5, (field, d_med, d_mean)


def argv(out: Path, *extra: str) -> list[str]:
    return tiny_argv(out, *extra, algorithms="fedavg,fedavg_median")


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (("--config.attack.kind=backdoor",), "Unknown config.attack.kind 'backdoor'; valid: none"),
        (("--config.attack.fraction=1.0",), "config.attack.fraction must be"),
        (("--config.attack.fraction=-0.1",), "config.attack.fraction must be"),
        (("--config.attack.kind=scale", "--config.attack.scale=0"), "attack.scale must be"),
        (("--config.attack.kind=gaussian", "--config.attack.scale=-1"), "attack.scale must be"),
        (("--config.attack.kind=sign_flip", "--config.cohort_size=2"), "cohort_size=0"),
        (("--config.aggregator.beta=0.5",), "config.aggregator.beta must be"),
    ],
)
def test_bad_attack_values_give_one_error_line(extra, says, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(runner, "train_run", lambda *a, **k: pytest.fail("trained"))
    assert run.main(argv(tmp_path / "out", *extra)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and says in errors[0] and "Traceback" not in err


def test_an_attacked_run_records_its_attack(tmp_path) -> None:
    out = tmp_path / "out"
    extra = ("--config.rounds=1", "--config.attack.kind=sign_flip", "--config.attack.fraction=0.5")
    assert run.main(argv(out, *extra, "--config.progress=false")) == 0
    summary = json.loads((out / "summary.json").read_text())
    chosen = attacks.choose_attackers(0, 4, 0.5)
    for r in summary["runs"]:
        assert r["attack"] == "sign_flip" and r["attack_fraction"] == 0.5
        assert r["attackers"] == np.flatnonzero(chosen).tolist()
    rows = [json.loads(line) for line in next((out / "history").glob("*.jsonl")).open()]
    assert rows[0]["attackers"] == np.flatnonzero(chosen).tolist()


@pytest.mark.parametrize("data", ["digits", "fashion_mnist"])
def test_the_robust_study_configs_are_valid(data: str) -> None:
    config = checks.validate(robust.get_config(data))
    assert "fedavg" in config.algorithms and "fedavg_median_bnavg" in config.algorithms


def test_every_rule_comes_with_robust_and_averaged_bn_statistics() -> None:
    """fedavg_<rule> folds BN statistics by the rule (one client's 1e6 statistics ignored);
    fedavg_<rule>_bnavg averages them (moved far)."""
    config = robust.get_config("digits")
    config.aggregator.f = 1  # Krum on 5 clients
    for rule in robust.RULES:
        for name, moved in ((f"fedavg_{rule}", False), (f"fedavg_{rule}_bnavg", True)):
            alg = registry.build_algorithm(name, MODEL, sgd(), config)
            server, msgs = stacked_messages(alg)
            huge = jax.tree.map(lambda s: s.at[0].set(1e6), float_leaves(msgs.pooled))
            msgs = msgs._replace(pooled=with_leaves(msgs.pooled, huge))
            pooled = float_leaves(alg.server_update(server, msgs, jnp.ones(C)).pooled)
            biggest = max(float(np.max(np.abs(v))) for v in pooled.values())
            assert (biggest > 1e4) == moved, (name, biggest)
