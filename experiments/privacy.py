"""DP-FedAvg from ``config.dp``: the library option, the sampler, and epsilon per round.

``config.dp.enabled`` turns it on for every algorithm of the run (one that cannot honour DP
is refused by its factory, which names the private alternatives). Sampling: with
``config.dp.q > 0`` each client takes part independently with probability ``q`` (Poisson),
in a bucket of ``config.cohort_size`` slots (0: ``sampling.poisson_bucket``); with ``q = 0``
a fixed-size uniform cohort of ``config.cohort_size`` (0: every client). The accountant uses
the matching event (``fedjax_bn.privacy.accountant``). ``config.dp.target_epsilon > 0``
calibrates the noise multiplier for ``config.rounds`` rounds before training.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import ml_collections

import fedjax_bn as fb
from fedjax_bn.privacy import accountant

Config = ml_collections.ConfigDict
ACCOUNTANTS = accountant.METHODS


class DpPlan(NamedTuple):
    """What a DP run uses: the population, the sampling, the noise and the accounting."""

    num_clients: int
    q: float | None  # Poisson rate, or None for fixed-size cohorts
    cohort_size: int  # slots per round (the Poisson bucket, or the fixed cohort)
    noise_multiplier: float
    delta: float
    method: str

    @property
    def expected_cohort_size(self) -> float:
        """The DP denominator: ``q * N`` under Poisson sampling, else the cohort size."""
        return self.q * self.num_clients if self.q else float(self.cohort_size)

    def sampling(self) -> dict[str, Any]:
        """The accountant's sampling keywords."""
        if self.q:
            return {"num_clients": self.num_clients, "q": self.q}
        return {"num_clients": self.num_clients, "cohort_size": self.cohort_size}


def enabled(config: Config) -> bool:
    """Whether ``config`` asks for DP."""
    return bool(config.get("dp") and config.dp.enabled)


def check(config: Config) -> None:
    """A ValueError (the runner reports it as a config error) for DP options that do not fit
    together; the numbers' ranges are checked in ``checks.BOUNDS``."""
    if not enabled(config):
        return
    dp = config.dp
    if dp.accountant not in ACCOUNTANTS:
        raise ValueError(
            f"Unknown config.dp.accountant {dp.accountant!r}; valid: {', '.join(ACCOUNTANTS)}."
        )
    if config.sampler != "uniform":
        raise ValueError(
            f"config.dp needs config.sampler=uniform (fixed-size cohorts) or config.dp.q > 0 "
            f"(Poisson sampling): the accountant has no event for {config.sampler!r}."
        )
    if config.budget_max_steps:
        raise ValueError("config.dp cannot be combined with step budgets (budget_max_steps).")
    plan(config)  # the calibration runs here, so a target it cannot meet fails before training


@functools.lru_cache(maxsize=32)
def _calibrate(target: float, rounds: int, delta: float, method: str, sampling: tuple) -> float:
    return accountant.calibrate_noise(target, rounds, delta, method=method, **dict(sampling))


def plan(config: Config) -> DpPlan:
    """The run's :class:`DpPlan` (noise calibrated to ``target_epsilon`` when it is > 0)."""
    dp = config.dp
    population = config.data.num_clients - config.held_out
    q = float(dp.q) or None
    if q:
        size = config.cohort_size or fb.sampling.poisson_bucket(population, q)
    else:
        size = config.cohort_size or population
    delta = float(dp.delta) or 1.0 / population
    draft = DpPlan(population, q, min(size, population), float(dp.noise_multiplier), delta, "")
    draft = draft._replace(method=dp.accountant)
    if dp.target_epsilon:
        sampling = tuple(sorted(draft.sampling().items()))
        try:
            z = _calibrate(float(dp.target_epsilon), config.rounds, delta, dp.accountant, sampling)
        except (ValueError, RuntimeError) as e:
            raise ValueError(f"config.dp.target_epsilon cannot be calibrated: {e}") from e
        draft = draft._replace(noise_multiplier=z)
    return draft


def gaussian(config: Config) -> fb.privacy.Gaussian:
    """The library's DP option for ``config``."""
    p, dp = plan(config), config.dp
    return fb.privacy.gaussian(
        p.noise_multiplier,
        float(dp.clip_norm),
        expected_cohort_size=p.expected_cohort_size,
        target_quantile=float(dp.target_quantile) or None,
        clip_learning_rate=float(dp.clip_learning_rate),
    )


def sampler(config: Config) -> tuple[int | None, Any]:
    """``(cohort_size, sampler)`` for ``make_round`` under DP."""
    p = plan(config)
    if p.q:
        return p.cohort_size, functools.partial(fb.sampling.poisson, q=p.q)
    return (p.cohort_size if p.cohort_size < p.num_clients else None), "uniform"


def epsilons(config: Config, rounds: int) -> list[float]:
    """Epsilon at the run's delta after each of rounds ``1..rounds``."""
    p = plan(config)
    if not p.noise_multiplier:
        return [float("inf")] * rounds
    fixed_size = not p.q and p.cohort_size < p.num_clients  # accounted as replace-one
    acc = accountant.make_accountant(p.method, replace_one=fixed_size)
    one = accountant.dp_event(p.noise_multiplier, 1, **p.sampling())
    out = []
    for _ in range(rounds):
        acc.compose(one)
        out.append(float(acc.get_epsilon(p.delta)))
    return out
