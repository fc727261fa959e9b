"""Aggregators over whole update vectors: weighted mean, norm bounding, Krum / Multi-Krum and
the geometric median (RFA).

Each client's update is one vector over all shared float leaves (:func:`flat_clients`), so
distances and norms are those of the whole model update.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_bn.robust.base import Aggregator, Deltas, flat_clients, present, unflat_clients
from fedjax_bn.robust.coordinate import median

Array = jax.Array


def _normalized(w_C: Array) -> Array:
    w_C = jnp.where(present(w_C), w_C, 0.0)
    return w_C / jnp.maximum(jnp.sum(w_C), 1e-30)


def _weighted(deltas: Deltas, w_C: Array) -> Deltas:
    p_C = _normalized(w_C)
    return {p: jnp.tensordot(p_C, d, axes=1) for p, d in deltas.items()}


def mean() -> Aggregator:
    """The weighted mean of the updates (FedAvg's rule, as an explicit aggregator)."""
    return Aggregator("mean", _weighted)


def norm_bound(max_norm: float) -> Aggregator:
    """Norm bounding (Sun et al. 2019): each update scaled to L2 norm at most ``max_norm``,
    then the weighted mean. BN statistics (not on the parameters' scale) take the median."""
    if not max_norm > 0:
        raise ValueError(f"norm_bound max_norm must be > 0, got {max_norm}.")

    def combine(deltas: Deltas, w_C: Array) -> Deltas:
        norm_C = jnp.linalg.norm(flat_clients(deltas), axis=1)
        scale_C = jnp.minimum(1.0, max_norm / jnp.maximum(norm_C, 1e-12))
        scaled = {p: d * scale_C.reshape((-1,) + (1,) * (d.ndim - 1)) for p, d in deltas.items()}
        return _weighted(scaled, w_C)

    return Aggregator(f"norm_bound({max_norm})", combine, stats=median().combine)


def krum_scores(x_CD: Array, ok_C: Array, f: int) -> Array:
    """Krum's score of each present client: the sum of squared distances to its
    ``n - f - 2`` nearest present neighbours; absent clients score ``+inf``."""
    sq_C = jnp.sum(jnp.square(x_CD), axis=1)
    d2_CC = jnp.maximum(sq_C[:, None] + sq_C[None, :] - 2.0 * x_CD @ x_CD.T, 0.0)
    pair = ok_C[:, None] & ok_C[None, :] & ~jnp.eye(x_CD.shape[0], dtype=bool)
    near = jnp.sort(jnp.where(pair, d2_CC, jnp.inf), axis=1)
    n = jnp.sum(ok_C.astype(jnp.int32))
    m = jnp.clip(n - f - 2, 0, jnp.maximum(n - 1, 0))
    score = jnp.sum(jnp.where(jnp.arange(x_CD.shape[0]) < m, near, 0.0), axis=1)
    return jnp.where(ok_C, score, jnp.inf)


def _check_f(f: int) -> None:
    if not (isinstance(f, int) and f >= 0):
        raise ValueError(f"Krum's f (clients assumed Byzantine) must be an int >= 0, got {f!r}.")


def krum(f: int) -> Aggregator:
    """Krum (Blanchard et al. 2017): the update of the present client whose ``n - f - 2``
    nearest neighbours are closest. Needs ``C >= 2f + 3`` cohort slots."""
    _check_f(f)

    def combine(deltas: Deltas, w_C: Array) -> Deltas:
        x_CD = flat_clients(deltas)
        best = jnp.argmin(krum_scores(x_CD, present(w_C), f))
        return unflat_clients(x_CD[best], deltas)

    return Aggregator(f"krum({f})", combine, min_clients=2 * f + 3)


def multi_krum(f: int, m: int | None = None) -> Aggregator:
    """Multi-Krum: the weighted mean of the ``m`` best-scored present clients (Krum's score;
    ``m=None``: ``n - f``). Needs ``C >= 2f + 3`` cohort slots."""
    _check_f(f)
    if m is not None and not (isinstance(m, int) and m >= 1):
        raise ValueError(f"multi_krum m (clients kept) must be an int >= 1 or None, got {m!r}.")

    def combine(deltas: Deltas, w_C: Array) -> Deltas:
        ok = present(w_C)
        score = krum_scores(flat_clients(deltas), ok, f)
        n = jnp.sum(ok.astype(jnp.int32))
        keep_n = n - f if m is None else jnp.minimum(m, n)
        rank = jnp.argsort(jnp.argsort(score))
        return _weighted(deltas, jnp.where((rank < keep_n) & ok, w_C, 0.0))

    return Aggregator(f"multi_krum({f},{m})", combine, min_clients=2 * f + 3)


def geometric_median(num_iters: int = 8, nu: float = 1e-6) -> Aggregator:
    """RFA (Pillutla et al. 2022): the weighted geometric median of the updates by the
    smoothed Weiszfeld algorithm, ``num_iters`` steps from the weighted mean, distances
    floored at ``nu``."""
    if not (isinstance(num_iters, int) and num_iters >= 1) or not nu > 0:
        raise ValueError(
            f"geometric_median needs num_iters >= 1 and nu > 0, got {num_iters}, {nu}."
        )

    def combine(deltas: Deltas, w_C: Array) -> Deltas:
        x_CD, a_C = flat_clients(deltas), _normalized(w_C)
        v_D = a_C @ x_CD
        for _ in range(num_iters):
            b_C = a_C / jnp.maximum(nu, jnp.linalg.norm(x_CD - v_D, axis=1))
            v_D = (b_C @ x_CD) / jnp.sum(b_C)
        return unflat_clients(v_D, deltas)

    return Aggregator(f"geometric_median({num_iters})", combine)
