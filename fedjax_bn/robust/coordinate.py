"""Coordinate-wise robust aggregators: median and trimmed mean over the taking-part clients.

Both are unweighted over the clients of positive weight, as in Yin et al. (ICML 2018) and
Flower's ``FedMedian`` / ``FedTrimmedAvg``: a weight says whether a client takes part, not how
much it counts (an attacker could otherwise claim many examples). Absent slots are sorted to the
end as ``+inf`` and the order statistics are read at the traced count ``n`` of present clients,
so one compiled program serves every cohort.
"""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp

from fedjax_bn.robust.base import Aggregator, Deltas, present

Array = jax.Array


def _sorted(d_CX: Array, ok_C: Array) -> Array:
    """The clients' values sorted along the client axis, absent slots last (+inf)."""
    ok = ok_C.reshape((-1,) + (1,) * (d_CX.ndim - 1))
    return jnp.sort(jnp.where(ok, d_CX, jnp.inf), axis=0)


def _median_leaf(d_CX: Array, ok_C: Array) -> Array:
    s = _sorted(d_CX, ok_C)
    n = jnp.maximum(jnp.sum(ok_C), 1)
    lo, hi = jnp.take(s, (n - 1) // 2, axis=0), jnp.take(s, n // 2, axis=0)
    return 0.5 * (lo + hi)


def median() -> Aggregator:
    """Coordinate-wise median of the present clients' updates (mean of the two middle values
    when their number is even, as ``numpy.median``)."""

    def combine(deltas: Deltas, w_C: Array) -> Deltas:
        ok = present(w_C)
        return {p: _median_leaf(d, ok) for p, d in deltas.items()}

    return Aggregator("median", combine)


def _trimmed_leaf(d_CX: Array, ok_C: Array, num: int, den: int) -> Array:
    s = _sorted(d_CX, ok_C)
    n = jnp.sum(ok_C.astype(jnp.int32))
    k = (n * num) // den  # floor(beta * n), exact for beta = num / den
    j = jnp.arange(s.shape[0]).reshape((-1,) + (1,) * (s.ndim - 1))
    keep = (j >= k) & (j < n - k)
    total = jnp.sum(jnp.where(keep, s, 0.0), axis=0)
    return total / jnp.maximum(n - 2 * k, 1).astype(jnp.float32)


def trimmed_mean(beta: float) -> Aggregator:
    """Coordinate-wise ``beta``-trimmed mean: per coordinate, the ``floor(beta * n)`` largest
    and smallest of the ``n`` present clients' values are dropped and the rest averaged (as
    ``scipy.stats.trim_mean``). ``beta`` in [0, 0.5); 0 is the unweighted mean."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(
            f"trimmed_mean beta must be in [0, 0.5) (the fraction cut at each end), got {beta}."
        )
    frac = Fraction(beta).limit_denominator(1000)

    def combine(deltas: Deltas, w_C: Array) -> Deltas:
        ok = present(w_C)
        return {
            p: _trimmed_leaf(d, ok, frac.numerator, frac.denominator) for p, d in deltas.items()
        }

    return Aggregator(f"trimmed_mean({beta})", combine)
