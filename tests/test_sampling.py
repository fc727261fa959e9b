"""Tests for the client samplers (fedjax_bn.sampling): determinism, shape, what each may draw,
how a short cohort is padded, and the draw frequencies each promises."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bn import sampling

N, K = 10, 4
KEY = jax.random.key(7)


def draws(fn, rounds: int, num: int, cohort: int) -> np.ndarray:
    """``[rounds, cohort]`` cohorts of rounds 0..rounds-1, vmapped (one compile)."""
    return np.asarray(jax.vmap(lambda r: fn(KEY, r, num, cohort))(jnp.arange(rounds)))


def check_cohort_ids(ids: np.ndarray, num: int, cohort: int) -> None:
    """Sorted int32 ids of length ``cohort``: distinct real ids in [0, num), then pads = num."""
    assert ids.dtype == np.int32 and ids.shape == (cohort,)
    assert np.all(np.diff(ids) >= 0)
    real = ids[ids < num]
    assert len(np.unique(real)) == len(real) and np.all(real >= 0)
    assert np.all(ids[len(real) :] == num)  # pads only after the real ids


SAMPLERS = {
    "uniform": sampling.uniform,
    "by_size": functools.partial(sampling.by_size, sizes=jnp.arange(1.0, N + 1)),
    "available": functools.partial(sampling.available, probabilities=jnp.full((N,), 0.7)),
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_same_key_and_round_give_the_same_cohort(name: str) -> None:
    fn = SAMPLERS[name]
    a, b = np.asarray(fn(KEY, 3, N, K)), np.asarray(fn(KEY, 3, N, K))
    np.testing.assert_array_equal(a, b)
    check_cohort_ids(a, N, K)
    many = draws(fn, 20, N, K)
    for ids in many:
        check_cohort_ids(ids, N, K)
    assert len({tuple(r) for r in many}) > 1  # rounds draw different cohorts
    other = np.asarray(fn(jax.random.key(8), 3, N, K))
    assert len({tuple(r) for r in many} | {tuple(other)}) > 1


def test_uniform_draws_everyone_at_full_participation_and_each_equally_often() -> None:
    np.testing.assert_array_equal(sampling.uniform(KEY, 0, N, N), np.arange(N))
    counts = np.bincount(draws(sampling.uniform, 2000, N, K).ravel(), minlength=N)
    np.testing.assert_allclose(counts / 2000, K / N, atol=0.05)  # 4 sigma is ~0.044


def test_by_size_never_draws_empty_clients_and_pads_when_too_few_hold_data() -> None:
    sizes = jnp.array([0.0, 3, 0, 1, 2])
    ids = np.asarray(sampling.by_size(KEY, 0, 5, 4, sizes))
    np.testing.assert_array_equal(ids, [1, 3, 4, 5])  # the three non-empty clients, one pad
    one = functools.partial(sampling.by_size, sizes=jnp.array([1.0, 2, 3, 0, 4]))
    counts = np.bincount(draws(one, 4000, 5, 1).ravel(), minlength=5)
    np.testing.assert_allclose(counts / 4000, [0.1, 0.2, 0.3, 0.0, 0.4], atol=0.03)
    assert counts[3] == 0


def test_available_draws_only_online_clients() -> None:
    p = jnp.array([0.0, 1, 0, 1, 0, 0])
    np.testing.assert_array_equal(sampling.available(KEY, 0, 6, 4, p), [1, 3, 6, 6])
    np.testing.assert_array_equal(sampling.available(KEY, 0, 6, 2, p), [1, 3])
    none = np.asarray(sampling.available(KEY, 0, 6, 3, jnp.zeros(6)))
    np.testing.assert_array_equal(none, [6, 6, 6])  # an empty cohort
    assert not np.any(sampling.cohort_mask(none, 6))
    every = functools.partial(sampling.available, probabilities=jnp.ones(N))
    assert np.all(draws(every, 50, N, K) < N)  # everyone online: always a full cohort
    half = functools.partial(sampling.available, probabilities=jnp.full((N,), 0.5))
    real = (draws(half, 2000, N, N) < N).sum(axis=1)  # cohort = every online client
    assert abs(real.mean() - N / 2) < 0.2


def test_cohort_mask_marks_real_slots() -> None:
    np.testing.assert_array_equal(sampling.cohort_mask(np.array([0, 2, 5, 5]), 5), [1, 1, 0, 0])


def test_samplers_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="cohort_size"):
        sampling.uniform(KEY, 0, 3, 4)
    with pytest.raises(ValueError, match="cohort_size"):
        sampling.uniform(KEY, 0, 3, 0)
    with pytest.raises(ValueError, match="shape"):
        sampling.by_size(KEY, 0, 3, 2, jnp.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        sampling.by_size(KEY, 0, 3, 2, jnp.array([1.0, -1, 2]))
    with pytest.raises(ValueError, match="probabilities"):
        sampling.available(KEY, 0, 3, 2, jnp.array([0.5, 1.5, 0]))
    with pytest.raises(ValueError, match="valid by name"):
        sampling.sampler_for("random", np.ones(3))
    assert sampling.sampler_for("uniform", np.ones(3)) is sampling.uniform
    np.testing.assert_array_equal(
        sampling.sampler_for("by_size", np.array([0, 5, 0]))(KEY, 0, 3, 2), [1, 3]
    )
