"""DP-FedAvg (fedjax_bn.privacy): the uniform-weight equivalence, what leaves a client under
each BN policy, the noise, adaptive clipping, Poisson sampling, and the accountant against
hand-computed RDP and dp_accounting itself."""

from __future__ import annotations

import functools
import math
from typing import Any

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CounterModel, assert_trees_close, assert_trees_equal, make_clients, sgd
from scipy import stats

import fedjax_bn as fb
from fedjax_bn import sampling
from fedjax_bn.client import Batch
from fedjax_bn.policy import bn_module_paths, partition
from fedjax_bn.privacy import accountant, gaussian
from fedjax_bn.privacy.dp_fedavg import DPMessage
from fedjax_bn.privacy.gaussian import global_norm, next_clip
from fedjax_bn.tree import flatten, take_client

SIZES = (5, 8, 3)  # unequal: example-count weights differ from uniform ones
C, B = len(SIZES), 4
DATA = make_clients(0, SIZES)
HUGE = 1e9  # a clip no update reaches


def make(policy: str, dp: Any = None, **kw: Any) -> fb.Algorithm:
    return fb.make_algorithm(CounterModel(), sgd(), policy=policy, dp=dp, **kw)


def init(alg: fb.Algorithm) -> fb.FedState:
    return alg.init(jax.random.key(0), DATA.x[0, :1], C)


def uniform_weights(alg: fb.Algorithm) -> fb.Algorithm:
    """``alg`` (and each of its stages) with every participating client weighted 1."""

    def server_update(server: Any, messages: Any, weights_C: jax.Array) -> Any:
        return alg.server_update(server, messages, (weights_C > 0).astype(jnp.float32))

    stages = tuple((first, uniform_weights(stage)) for first, stage in alg.stages)
    return alg._replace(server_update=server_update, stages=stages)


def run(alg: fb.Algorithm, rounds: int = 2) -> fb.FedState:
    rnd = fb.make_round(alg, executor="sequential", batch_size=B)
    state = init(alg)
    for r in range(rounds):
        state, _ = rnd(state, DATA, jax.random.key(r))
    return state


@pytest.mark.parametrize(
    "policy,bn_stats", [("fedavg", "pooled"), ("fedavg", "mean"), ("silobn", "pooled")]
)
def test_no_noise_and_no_clip_is_fedavg_with_uniform_weights(policy: str, bn_stats: str) -> None:
    plain = run(uniform_weights(make(policy, bn_stats=bn_stats)))
    private = run(make(policy, gaussian(0.0, HUGE), bn_stats=bn_stats))
    assert_trees_close(private.server.shared, plain.server.shared, rtol=1e-4, atol=1e-5)
    assert_trees_close(private.server.pooled, plain.server.pooled, rtol=1e-4, atol=1e-5)
    assert_trees_close(private.clients, plain.clients, rtol=1e-4, atol=1e-5)
    assert int(private.server.dp.round) == 2
    # ... and not FedAvg with example-count weights (the sizes differ):
    counts = run(make(policy, bn_stats=bn_stats))
    diff = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), counts.server.shared,
                        private.server.shared)  # fmt: skip
    assert max(jax.tree.leaves(diff)) > 1e-4


def test_fixbn_without_noise_or_clip_is_fixbn_with_uniform_weights() -> None:
    make_fixbn = functools.partial(fb.fixbn, CounterModel(), sgd(), fix_round=1)
    plain = run(uniform_weights(make_fixbn()), rounds=3)
    private = run(make_fixbn(dp=gaussian(0.0, HUGE)), rounds=3)
    assert_trees_close(private.server.shared, plain.server.shared, rtol=1e-4, atol=1e-5)
    assert_trees_close(private.server.pooled, plain.server.pooled, rtol=1e-4, atol=1e-5)
    assert_trees_close(private.clients, plain.clients, rtol=1e-4, atol=1e-5)
    assert int(private.server.dp.round) == 3


def client_messages(alg: fb.Algorithm, state: fb.FedState) -> DPMessage:
    """Every client's message after two local steps (full batches of its own data)."""
    outs = []
    for c in range(C):
        carry = alg.client_init(state.server, take_client(state.clients, c))
        for s in range(2):
            x, y = DATA.x[c, s : s + 2], DATA.y[c, s : s + 2]
            carry = alg.client_step(carry, Batch(x, y, None, jax.random.key(s)))
        outs.append(alg.client_final(carry)[0])
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)


@pytest.mark.parametrize("policy", ["fedbn", "silobn", "fedavg"])
def test_what_leaves_a_client_is_one_clipped_update(policy: str) -> None:
    clip = 0.05
    alg = make(policy, gaussian(1.0, clip, target_quantile=0.5, count_stddev=1.0))
    state = init(alg)
    messages = client_messages(alg, state)
    assert isinstance(messages, DPMessage) and DPMessage._fields == ("delta", "below")
    local = take_client(state.clients.local, 0)
    variables = fb.merge(state.server.shared, state.server.pooled, local)
    bn_layers = bn_module_paths(variables)
    sent = set(flatten(messages.delta))
    is_bn = {p for p in sent if p[0] == "batch_stats" or p[1:-1] in bn_layers}
    params = {p for p in sent if p[0] == "params"}
    shared = set(flatten(partition(variables, policy).shared))
    if policy == "fedbn":  # nothing of BN leaves a client
        assert not is_bn and params == shared
    elif policy == "silobn":  # BN affine inside the update, statistics local
        assert params == shared and {p[0] for p in is_bn} == {"params"}
    else:  # fedavg: the float BN statistics inside the clipped vector, the int counter not
        stats = {p for p in sent if p[0] == "batch_stats"}
        assert {p[-1] for p in stats} == {"mean", "var"}
    for leaf in jax.tree.leaves(messages.delta):  # no integer leaf, no example or step count
        assert jnp.issubdtype(leaf.dtype, jnp.floating)
    for c in range(C):  # jointly clipped: every client's whole update has norm <= clip
        norm = float(global_norm(flatten(take_client(messages.delta, c))))
        assert norm <= clip * (1 + 1e-5)
        assert norm == pytest.approx(clip, rel=1e-4)  # two steps of lr 0.1 move more than 0.05
    assert set(np.asarray(messages.below).tolist()) <= {0.0, 1.0}


def test_fixbn_under_dp_sends_no_statistics_after_the_freeze() -> None:
    clip, fix_round = 0.05, 1
    alg = fb.fixbn(CounterModel(), sgd(), fix_round=fix_round, dp=gaussian(1.0, clip))
    rnd = fb.make_round(alg, executor="sequential", batch_size=B)
    state = init(alg)
    for r, (first, stage) in enumerate(alg.stages):  # one round of each phase
        assert first == r * fix_round and int(state.server.dp.round) == first
        messages = client_messages(stage, state)
        again = client_messages(alg, state)  # the algorithm's own functions: the same phase
        assert_trees_close(again, messages, rtol=1e-5, atol=1e-6)
        stats = {p: v for p, v in flatten(messages.delta).items() if p[0] == "batch_stats"}
        assert {p[-1] for p in stats} == {"mean", "var"}
        moved = [bool(jnp.any(v != 0)) for v in stats.values()]
        assert all(moved) if first < fix_round else not any(moved)  # zero: no data in it
        for c in range(C):  # the rest is one update clipped jointly, in both phases
            norm = float(global_norm(flatten(take_client(messages.delta, c))))
            assert norm == pytest.approx(clip, rel=1e-4)
        new = stage.server_update(state.server, messages, jnp.ones(C))
        if first >= fix_round:  # the server keeps the statistics of the freeze, bit for bit
            assert_trees_equal(new.pooled, state.server.pooled)
        else:
            assert not all(jax.tree.leaves(jax.tree.map(
                lambda a, b: bool(jnp.all(a == b)), new.pooled, state.server.pooled)))  # fmt: skip
        state, _ = rnd(state, DATA, jax.random.key(r))


@pytest.mark.parametrize("policy", ["fedbn", "fedavg"])
def test_server_reads_weights_only_as_participation(policy: str) -> None:
    alg = make(policy, gaussian(1.0, 0.05))
    state = init(alg)
    messages = client_messages(alg, state)
    update = jax.jit(alg.server_update)
    ones = update(state.server, messages, jnp.ones(C))
    assert_trees_equal(ones, update(state.server, messages, jnp.asarray(SIZES, jnp.float32)))
    # A slot of weight zero (empty or quarantined) contributes nothing, whatever it holds:
    junk = jax.tree.map(lambda a: a.at[1].set(123.0), messages)
    zero = jnp.array([1.0, 0.0, 1.0])
    assert_trees_equal(update(state.server, messages, zero), update(state.server, junk, zero))


def test_noise_has_std_noise_multiplier_times_clip_over_the_cohort_and_is_reproducible() -> None:
    z, clip, m = 2.0, 3.0, 4.0
    alg = make("fedbn", gaussian(z, clip, expected_cohort_size=m))
    state = init(alg)
    zeros = client_messages(alg, state)._replace()
    zeros = jax.tree.map(jnp.zeros_like, zeros)
    new = alg.server_update(state.server, zeros, jnp.ones(C))
    old, moved = flatten(state.server.shared), flatten(new.shared)
    noise = np.concatenate([np.ravel(moved[p] - old[p]) for p in old])
    assert noise.size > 20
    # A chi-square interval for the sample std of n normal draws (99.99%):
    lo, hi = (math.sqrt(stats.chi2.ppf(q, noise.size) / noise.size) for q in (1e-4, 1 - 1e-4))
    assert lo * z * clip / m <= float(np.sqrt(np.mean(noise**2))) <= hi * z * clip / m
    assert_trees_equal(new, alg.server_update(state.server, zeros, jnp.ones(C)))
    again = alg.server_update(new, zeros, jnp.ones(C))
    assert not np.allclose(flatten(again.shared)[next(iter(old))] - moved[next(iter(old))],
                           moved[next(iter(old))] - old[next(iter(old))])  # fmt: skip


def test_an_empty_round_still_releases_noise() -> None:
    alg = make("fedbn", gaussian(1.0, 1.0, expected_cohort_size=2.0))
    none = functools.partial(sampling.available, probabilities=jnp.zeros(C))
    rnd = fb.make_round(alg, executor="sequential", batch_size=B, cohort_size=2, sampler=none)
    state = init(alg)
    new, res = rnd(state, DATA, jax.random.key(0))
    np.testing.assert_array_equal(res.clients, [C, C])
    assert int(new.server.dp.round) == 1
    assert_trees_equal(new.clients, state.clients)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new.server.shared,
                           state.server.shared)  # fmt: skip
    assert all(jax.tree.leaves(changed))


def test_fedavg_statistics_under_noise_keep_variances_above_the_floor() -> None:
    alg = make("fedavg", gaussian(50.0, 1.0, variance_floor=1e-3))
    state = init(alg)
    new = alg.server_update(state.server, client_messages(alg, state), jnp.ones(C))
    var = [v for p, v in flatten(new.pooled).items() if p[-1] == "var"]
    assert var and all(bool(jnp.all(v >= 1e-3)) for v in var)
    counter = [v for p, v in flatten(new.pooled).items() if p[-1] == "num_batches_tracked"]
    assert_trees_equal(counter, [v for p, v in flatten(state.server.pooled).items()
                                 if p[-1] == "num_batches_tracked"])  # fmt: skip


def test_adaptive_clip_moves_toward_the_target_quantile_by_hand() -> None:
    dp = gaussian(0.0, 1.0, target_quantile=0.5, clip_learning_rate=0.2)
    mask, key = jnp.ones(4), jax.random.key(0)
    # All four below the clip: the fraction is 1, the clip shrinks by exp(-0.2 * (1 - 0.5)).
    down = next_clip(dp, jnp.float32(1.0), jnp.ones(4), mask, 4, key)
    assert float(down) == pytest.approx(math.exp(-0.1), rel=1e-6)
    # One of four below: exp(-0.2 * (0.25 - 0.5)).
    up = next_clip(dp, jnp.float32(1.0), jnp.array([1.0, 0, 0, 0]), mask, 4, key)
    assert float(up) == pytest.approx(math.exp(0.05), rel=1e-6)
    # Updates of norms 1, 2, 3, 4 and target 0.5: the clip settles between 2 and 3.
    norms, clip = jnp.array([1.0, 2.0, 3.0, 4.0]), jnp.float32(10.0)
    for _ in range(100):
        clip = next_clip(dp, clip, (norms <= clip).astype(jnp.float32), mask, 4, key)
    assert 2.0 * math.exp(-0.1) <= float(clip) <= 3.0 * math.exp(0.1)
    fixed = gaussian(0.0, 1.0)
    assert float(next_clip(fixed, jnp.float32(1.0), jnp.ones(4), mask, 4, key)) == 1.0


def test_adaptive_clipping_splits_the_noise_budget() -> None:
    dp = gaussian(1.0, 1.0, target_quantile=0.5)  # count std 100 / 20 = 5
    assert dp.update_noise_multiplier(100.0) == pytest.approx((1 - 1 / 100) ** -0.5)
    with pytest.raises(ValueError, match="count_stddev"):
        dp.update_noise_multiplier(10.0)  # count std 0.5: 2 * 0.5 <= 1
    with pytest.raises(ValueError, match="count_stddev"):
        gaussian(2.0, 1.0, target_quantile=0.5, count_stddev=1.0)


def test_clip_trajectory_is_carried_in_the_server_state() -> None:
    alg = make("silobn", gaussian(0.0, HUGE, target_quantile=0.5))
    state = run(alg, rounds=2)
    per_round = math.exp(-0.2 * (1 - 0.5))  # every update below the clip: fraction 1
    assert float(state.server.dp.clip) == pytest.approx(HUGE * per_round**2, rel=1e-5)


def rdp_by_hand(z: float, rounds: int, alpha: float, delta: float) -> float:
    """Full participation: RDP ``rounds * alpha / (2 z^2)``, converted as dp_accounting's
    improved bound (Canonne et al. 2020, Prop. 12)."""
    rdp = rounds * alpha / (2 * z * z)
    return rdp + math.log1p(-1 / alpha) - math.log(delta * alpha) / (alpha - 1)


@pytest.mark.parametrize("z,rounds,alpha", [(1.0, 10, 8.0), (2.5, 100, 20.0), (5.0, 3, 2.0)])
def test_full_participation_epsilon_is_the_gaussian_rdp_by_hand(
    z: float, rounds: int, alpha: float
) -> None:
    delta = 1e-5
    eps = accountant.epsilon(z, rounds, delta, num_clients=50, cohort_size=50, orders=[alpha])
    assert eps == pytest.approx(rdp_by_hand(z, rounds, alpha, delta), rel=1e-9)
    best = accountant.epsilon(z, rounds, delta, num_clients=50, cohort_size=50)
    assert best <= eps + 1e-12  # the default orders minimize over alpha
    assert accountant.epsilon(z, rounds, delta, num_clients=50, q=1.0) == pytest.approx(best)


def test_epsilon_is_monotone_in_noise_rounds_and_sampling_rate() -> None:
    kw = {"num_clients": 1000, "q": 0.05}
    eps = functools.partial(accountant.epsilon, delta=1e-3)
    assert eps(0.8, 50, **kw) > eps(1.0, 50, **kw) > eps(2.0, 50, **kw)
    assert eps(1.0, 10, **kw) < eps(1.0, 50, **kw) < eps(1.0, 200, **kw)
    q_eps = [eps(1.0, 50, num_clients=1000, q=q) for q in (0.01, 0.05, 0.2)]
    assert q_eps == sorted(q_eps) and len(set(q_eps)) == 3
    k_eps = [eps(1.0, 50, num_clients=1000, cohort_size=k) for k in (10, 50, 200)]
    assert k_eps == sorted(k_eps) and len(set(k_eps)) == 3
    pld = [eps(1.0, r, method="pld", **kw) for r in (10, 50, 200)]
    assert pld == sorted(pld) and all(0 < p < float("inf") for p in pld)
    assert eps(0.0, 5, **kw) == float("inf") and eps(1.0, 0, **kw) == 0.0


def test_accountant_uses_the_sampling_event_of_the_sampler() -> None:
    poisson = accountant.dp_event(1.0, 7, num_clients=100, q=0.1)
    fixed = accountant.dp_event(1.0, 7, num_clients=100, cohort_size=10)
    assert isinstance(poisson.event, dp_accounting.PoissonSampledDpEvent)
    assert isinstance(fixed.event, dp_accounting.SampledWithoutReplacementDpEvent)
    assert poisson.count == fixed.count == 7
    with pytest.raises(ValueError, match="PLD"):
        accountant.epsilon(1.0, 7, 1e-5, num_clients=100, cohort_size=10, method="pld")
    with pytest.raises(ValueError, match="exactly one"):
        accountant.epsilon(1.0, 7, 1e-5, num_clients=100)


@pytest.mark.parametrize("method", ["rdp", "pld"])
def test_calibrated_noise_meets_the_target_epsilon(method: str) -> None:
    kw = {"num_clients": 500, "q": 0.1, "method": method}
    z = accountant.calibrate_noise(4.0, 10, 1 / 500, **kw)
    assert accountant.epsilon(z, 10, 1 / 500, **kw) <= 4.0 + 1e-6
    assert accountant.epsilon(0.97 * z, 10, 1 / 500, **kw) > 4.0  # the smallest that does


def test_poisson_sampling_pads_to_the_bucket() -> None:
    n, q, k = 200, 0.1, sampling.poisson_bucket(200, 0.1, overflow=1e-6)
    assert stats.binom.sf(k, n, q) <= 1e-6 < stats.binom.sf(k - 1, n, q)
    key, counts = jax.random.key(3), []
    for r in range(200):
        ids = np.asarray(sampling.poisson(key, r, n, k, q))
        real = ids[ids < n]
        assert ids.shape == (k,) and np.all(np.diff(ids) >= 0) and np.all(ids[len(real) :] == n)
        counts.append(len(real))
    # The mean cohort size is q * n within 4 standard errors of 200 binomial draws.
    assert abs(np.mean(counts) - q * n) <= 4 * math.sqrt(n * q * (1 - q) / 200)
    assert len(set(counts)) > 3  # variable cohorts
    with pytest.raises(ValueError, match="q must lie"):
        sampling.poisson(key, 0, n, k, 0.0)


def test_poisson_cohort_rounds_run_under_dp() -> None:
    alg = make("fedbn", gaussian(1.0, 1.0, expected_cohort_size=1.5))
    sampler = functools.partial(sampling.poisson, q=0.5)
    rnd = fb.make_round(alg, executor="sequential", batch_size=B, cohort_size=C, sampler=sampler)
    state = init(alg)
    for r in range(3):
        state, _ = rnd(state, DATA, jax.random.key(r))
    assert int(state.server.dp.round) == 3
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.server.shared))


def test_dp_is_refused_where_it_cannot_cover_what_a_client_sends() -> None:
    dp = gaussian(1.0, 1.0)
    model, tx = CounterModel(), sgd()
    with pytest.raises(ValueError, match="control-variate"):
        fb.scaffold(model, tx, lr=0.1, dp=dp)
    with pytest.raises(ValueError, match="step count"):
        fb.fednova(model, tx, dp=dp)
    with pytest.raises(ValueError, match="aggregator"):
        fb.fixbn(model, tx, fix_round=2, dp=dp, aggregator=fb.robust.median())
    with pytest.raises(ValueError, match="no clip_norm"):
        fb.fedavg(model, tx, dp=dp, clip_norm=1.0)
    with pytest.raises(TypeError, match="privacy.gaussian"):
        fb.fedavg(model, tx, dp={"noise_multiplier": 1.0})
    for bad in ({"noise_multiplier": -1.0}, {"clip_norm": 0.0}, {"target_quantile": 1.0}):
        with pytest.raises(ValueError):
            gaussian(**{"noise_multiplier": 1.0, "clip_norm": 1.0, **bad})


def test_import_fedjax_bn_does_not_load_dp_accounting() -> None:
    import subprocess
    import sys

    code = "import sys, fedjax_bn; fedjax_bn.privacy.gaussian(1.0, 1.0); "
    code += "print('dp_accounting' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
