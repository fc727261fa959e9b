"""Privacy accounting of DP-FedAvg with ``dp_accounting`` (RDP or PLD), user-level.

One round is a Gaussian mechanism of noise multiplier ``z`` (sensitivity: one client's clipped
update) on a sampled cohort; ``rounds`` of them compose. The sampling event matches the
sampler (:func:`dp_event`):

- full participation (``cohort_size == num_clients``): ``GaussianDpEvent(z)``;
- Poisson sampling with rate ``q`` (``sampling.poisson``): ``PoissonSampledDpEvent``, under
  add-or-remove-one neighbouring;
- a fixed-size cohort drawn uniformly without replacement (``sampling.uniform``):
  ``SampledWithoutReplacementDpEvent``, which ``dp_accounting`` accounts under
  replace-one neighbouring (RDP only).

``dp_accounting`` is imported inside the functions, so ``import fedjax_bn`` never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

Method = Literal["rdp", "pld"]
METHODS: tuple[str, ...] = ("rdp", "pld")


def check_sampling(num_clients: int, cohort_size: int | None, q: float | None) -> None:
    """Raise a ValueError unless exactly one of ``cohort_size`` and ``q`` describes sampling."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    if (cohort_size is None) == (q is None):
        raise ValueError("Give exactly one of cohort_size (fixed-size cohorts) and q (Poisson).")
    if q is not None and not 0 < q <= 1:
        raise ValueError(f"The Poisson sampling rate q must lie in (0, 1], got {q}.")
    if cohort_size is not None and not 1 <= cohort_size <= num_clients:
        raise ValueError(f"cohort_size must lie in [1, {num_clients}], got {cohort_size}.")


def dp_event(
    noise_multiplier: float,
    rounds: int,
    *,
    num_clients: int,
    cohort_size: int | None = None,
    q: float | None = None,
) -> Any:
    """The ``dp_accounting`` event of ``rounds`` DP-FedAvg rounds (module docstring)."""
    import dp_accounting

    check_sampling(num_clients, cohort_size, q)
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}.")
    round_event = dp_accounting.GaussianDpEvent(noise_multiplier)
    if q is not None and q < 1:
        round_event = dp_accounting.PoissonSampledDpEvent(q, round_event)
    elif cohort_size is not None and cohort_size < num_clients:
        round_event = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, cohort_size, round_event
        )
    return dp_accounting.SelfComposedDpEvent(round_event, rounds)


def _replace_one(event: Any) -> bool:
    import dp_accounting

    inner = event.event if isinstance(event, dp_accounting.SelfComposedDpEvent) else event
    return isinstance(inner, dp_accounting.SampledWithoutReplacementDpEvent)


def make_accountant(
    method: Method, *, replace_one: bool = False, orders: Sequence[float] | None = None
) -> Any:
    """A fresh ``dp_accounting`` accountant (RDP at ``orders`` or its defaults, or PLD)."""
    import dp_accounting

    relation = dp_accounting.NeighboringRelation
    rel = relation.REPLACE_ONE if replace_one else relation.ADD_OR_REMOVE_ONE
    if method == "rdp":
        return dp_accounting.rdp.RdpAccountant(orders=orders, neighboring_relation=rel)
    if method == "pld":
        if replace_one:
            raise ValueError(
                "PLD accounting of fixed-size cohorts (sampling without replacement) is not "
                "supported by dp_accounting; use method='rdp' or Poisson sampling (q=)."
            )
        return dp_accounting.pld.PLDAccountant(neighboring_relation=rel)
    raise ValueError(f"Unknown accounting method {method!r}; valid: {', '.join(METHODS)}.")


def epsilon(
    noise_multiplier: float,
    rounds: int,
    delta: float,
    *,
    num_clients: int,
    cohort_size: int | None = None,
    q: float | None = None,
    method: Method = "rdp",
    orders: Sequence[float] | None = None,
) -> float:
    """The epsilon at ``delta`` after ``rounds`` rounds (inf without noise, 0 after 0 rounds)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}.")
    event = dp_event(
        noise_multiplier, rounds, num_clients=num_clients, cohort_size=cohort_size, q=q
    )
    if rounds == 0:
        return 0.0
    if noise_multiplier == 0:
        return float("inf")
    accountant = make_accountant(method, replace_one=_replace_one(event), orders=orders)
    return float(accountant.compose(event).get_epsilon(delta))


def calibrate_noise(
    target_epsilon: float,
    rounds: int,
    delta: float,
    *,
    num_clients: int,
    cohort_size: int | None = None,
    q: float | None = None,
    method: Method = "rdp",
) -> float:
    """The smallest noise multiplier whose ``rounds`` rounds cost at most ``target_epsilon``
    at ``delta`` (``dp_accounting.calibrate_dp_mechanism``)."""
    import dp_accounting

    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}.")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 to calibrate, got {rounds}.")

    def event(z: float) -> Any:
        return dp_event(z, rounds, num_clients=num_clients, cohort_size=cohort_size, q=q)

    replace_one = _replace_one(event(1.0))

    def solve(method: Method, bracket: Any) -> float:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                lambda: make_accountant(method, replace_one=replace_one),
                event,
                target_epsilon,
                delta,
                bracket,
            )
        )

    z_rdp = solve("rdp", dp_accounting.LowerEndpointAndGuess(1e-3, 1.0))
    if method == "rdp":
        return z_rdp
    # PLD is tighter than RDP (a smaller z suffices) and very slow at tiny z: search below
    # the RDP answer only.
    return solve(method, dp_accounting.ExplicitBracketInterval(0.25 * z_rdp, 1.01 * z_rdp))
