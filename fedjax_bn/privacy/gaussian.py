"""The Gaussian mechanism of DP-FedAvg (McMahan et al. 2018) with fixed or adaptive clipping
(Andrew et al. 2021): the configuration and the math on flat ``{path: leaf}`` dicts.

A client clips its update (everything it sends, jointly) to L2 norm ``clip``; the server sums
the clipped updates of the clients that took part, adds ``N(0, (z_update * clip)^2)`` to every
coordinate of the sum and divides by a fixed denominator (the expected cohort size), so neither
example counts nor the realized cohort size enter the result.

Adaptive clipping: each client also sends the bit ``b = [||update|| <= clip]``; the server
noises ``sum(b - 1/2)`` with std ``count_stddev`` and moves the clip geometrically,
``clip <- clip * exp(-lr * (b_mean - target_quantile))``. The two Gaussian releases together
cost what one Gaussian of noise multiplier ``noise_multiplier`` costs when
``z_update = (z^-2 - (2 count_stddev)^-2)^(-1/2)`` (Andrew et al. 2021, Thm. 1; TFF's
``DifferentiallyPrivateFactory.gaussian_adaptive``), so the accountant sees ``z`` alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bn.tree import Path

Array = jax.Array
Flat = dict[Path, Array]


class Gaussian(NamedTuple):
    """DP-FedAvg's configuration (build it with :func:`gaussian`, which validates it)."""

    noise_multiplier: float  # z: the accountant's noise multiplier (count included)
    clip_norm: float  # the L2 clip (the starting clip when adaptive)
    expected_cohort_size: float | None = None  # denominator; None: the round's slot count
    target_quantile: float | None = None  # adaptive clipping's target; None: fixed clip
    clip_learning_rate: float = 0.2  # adaptive: geometric step of the clip
    count_stddev: float | None = None  # adaptive: noise std of the clipped count
    variance_floor: float = 1e-4  # fedavg policy: BN running variances stay >= this
    seed: int = 0  # noise stream; round r's noise is fold_in(key(seed), r)

    @property
    def adaptive(self) -> bool:
        """Whether the clip follows a target quantile of the update norms."""
        return self.target_quantile is not None

    def update_noise_multiplier(self, denominator: float) -> float:
        """The noise multiplier of the update sum: ``z`` with a fixed clip, else the share
        left after the clipped count's noise (module docstring)."""
        if not self.adaptive or self.noise_multiplier == 0:
            return float(self.noise_multiplier)
        count = self.count_std(denominator)
        check_count_noise(self.noise_multiplier, count)
        return (self.noise_multiplier**-2 - (2 * count) ** -2) ** -0.5

    def count_std(self, denominator: float) -> float:
        """Noise std of the clipped count: ``count_stddev``, default ``denominator / 20``
        (Andrew et al.'s recommendation); 0 without noise."""
        if self.noise_multiplier == 0:
            return 0.0
        return self.count_stddev if self.count_stddev is not None else denominator / 20


def gaussian(
    noise_multiplier: float,
    clip_norm: float,
    *,
    expected_cohort_size: float | None = None,
    target_quantile: float | None = None,
    clip_learning_rate: float = 0.2,
    count_stddev: float | None = None,
    variance_floor: float = 1e-4,
    seed: int = 0,
) -> Gaussian:
    """DP-FedAvg with Gaussian noise ``noise_multiplier * clip`` on the sum of clipped updates.

    ``expected_cohort_size``: the fixed denominator (``q * N`` under Poisson sampling); None
    divides by the round's number of cohort slots, right for full participation and fixed-size
    cohorts. ``target_quantile`` in (0, 1) turns on adaptive clipping from ``clip_norm``.
    Pass the result as ``make_algorithm(..., dp=...)``; account with
    :mod:`fedjax_bn.privacy.accountant` using ``noise_multiplier``.
    """
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}.")
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}.")
    if expected_cohort_size is not None and not expected_cohort_size > 0:
        raise ValueError(f"expected_cohort_size must be > 0, got {expected_cohort_size}.")
    if target_quantile is not None and not 0 < target_quantile < 1:
        raise ValueError(f"target_quantile must lie in (0, 1), got {target_quantile}.")
    if not clip_learning_rate > 0:
        raise ValueError(f"clip_learning_rate must be > 0, got {clip_learning_rate}.")
    if count_stddev is not None and not count_stddev > 0:
        raise ValueError(f"count_stddev must be > 0, got {count_stddev}.")
    if not variance_floor > 0:
        raise ValueError(f"variance_floor must be > 0, got {variance_floor}.")
    config = Gaussian(
        float(noise_multiplier),
        float(clip_norm),
        expected_cohort_size,
        target_quantile,
        float(clip_learning_rate),
        count_stddev,
        float(variance_floor),
        int(seed),
    )
    if config.adaptive and count_stddev is not None:
        check_count_noise(noise_multiplier, count_stddev)
    return config


def check_count_noise(noise_multiplier: float, count_std: float) -> None:
    """Raise a ValueError unless the clipped count's noise leaves budget for the update's."""
    if noise_multiplier > 0 and 2 * count_std <= noise_multiplier:
        raise ValueError(
            f"Adaptive clipping needs 2 * count_stddev > noise_multiplier (the count's noise "
            f"must cost less than the whole budget), got count_stddev={count_std} and "
            f"noise_multiplier={noise_multiplier}; raise count_stddev (its default is "
            "expected_cohort_size / 20) or the cohort size."
        )


def global_norm(flat_X: Flat) -> Array:
    """The L2 norm of all float leaves together (one client, no client axis)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(v.astype(jnp.float32))) for v in flat_X.values()))


def clip_flat(delta_X: Flat, clip: Array) -> tuple[Flat, Array]:
    """``(delta scaled to norm <= clip, bit [norm <= clip])`` for one client's update."""
    norm = global_norm(delta_X)
    scale = jnp.minimum(1.0, clip / jnp.maximum(norm, 1e-12))
    clipped = {p: (v.astype(jnp.float32) * scale) for p, v in delta_X.items()}
    return clipped, (norm <= clip).astype(jnp.float32)


def noised_mean(
    delta_CX: Flat, mask_C: Array, std: Array, denominator: float | Array, key: Array
) -> Flat:
    """``(sum_c mask_c delta_c + N(0, std^2)) / denominator`` per leaf, a fresh key per leaf."""
    keys = jax.random.split(key, max(1, len(delta_CX)))
    out = {}
    for k, (p, v) in zip(keys, sorted(delta_CX.items()), strict=False):
        total = jnp.tensordot(mask_C, v.astype(jnp.float32), axes=1)
        out[p] = (total + std * jax.random.normal(k, total.shape)) / denominator
    return out


def next_clip(
    config: Gaussian,
    clip: Array,
    below_C: Array,
    mask_C: Array,
    denominator: float | Array,
    key: Array,
) -> Array:
    """Adaptive clipping's step: the noised fraction of clients at or below the clip moves the
    clip geometrically toward ``target_quantile`` (unchanged with a fixed clip)."""
    if not config.adaptive:
        return clip
    count = jnp.sum(mask_C * (below_C - 0.5))
    count = count + config.count_std(float(denominator)) * jax.random.normal(key, ())
    fraction = count / denominator + 0.5
    return clip * jnp.exp(-config.clip_learning_rate * (fraction - config.target_quantile))
