"""``RoundOptions``: everything that says how a round runs, in one frozen object checked once.

``None`` means "the executor's default" for every executor option, so a value is only ever
given by whoever means it; ``make_round(alg, options)`` builds the round from it, and each
executor reads the options it knows (``registry.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from jax.sharding import Mesh

from fedjax_bn import sampling
from fedjax_bn.budgets import Budget
from fedjax_bn.execution import registry
from fedjax_bn.execution.loop import LocalLoop, check_loop
from fedjax_bn.execution.store import Placement, check_placement
from fedjax_bn.sampling import Sampler


@dataclasses.dataclass(frozen=True)
class RoundOptions:
    """How a round runs (checked when built: a bad value raises a ValueError naming it).

    ``executor``: ``auto`` or a name in ``registry.REGISTRY`` (``auto``: picked per backend
    and cohort size by ``registry.choose_executor``); ``batch_size``, ``local_epochs``: each
    client's local training. Executor options, None: the executor's default:

    - ``loop``: local steps as ``scan`` or ``unroll`` in the lockstep executors (default:
      unroll on CPU, scan elsewhere);
    - ``chunk_size``: clients per chunk for ``chunked`` (default ``AUTO_CHUNK_SIZE``) and per
      device for ``sharded`` (default: all at once);
    - ``num_groups``: lockstep executors split the cohort into this many groups of similar size
      to cut padded steps (default 1);
    - ``mesh``: devices for ``sharded`` (default: all);
    - ``steps_per_call``: full steps unrolled into one jitted call by ``sequential`` (default 1);
    - ``client_threads``: host threads that run ``sequential``'s clients concurrently (default
      2 on a CPU with 2+ cores, else 1; the result is bitwise the same for any number).

    ``cohort_size``: train a sampled cohort of this many clients of the population each round
    (``cohort.CohortRound``); None: every client, every round. ``sampler``: ``"uniform"``,
    ``"by_size"`` or a :data:`~fedjax_bn.sampling.Sampler`; ``state_placement``: the
    population's client state on the ``"device"``, the ``"host"`` (numpy) or ``"auto"``
    (``store.py``). ``donate_state``: a cohort round writes the cohort's rows into the
    population's client state in place (O(K) a round instead of a copy of all N rows), so the
    state passed in must not be used again.

    ``budget``: stragglers, each client's most local steps per round (``fedjax_bn.budgets``):
    None (no limit), one int per client (fixed; with ``cohort_size`` one per population id) or
    a :data:`~fedjax_bn.budgets.Budget` drawn per round, e.g. ``budgets.uniform_steps(1, 5)``.
    Steps past it are masked (lockstep executors) or skipped (``sequential``); a client's
    weight stays its size ``n_c``, 0 with budget 0.
    """

    executor: str = "auto"
    batch_size: int = 32
    local_epochs: int = 1
    loop: LocalLoop | None = None
    chunk_size: int | None = None
    num_groups: int | None = None
    mesh: Mesh | None = None
    steps_per_call: int | None = None
    client_threads: int | None = None
    cohort_size: int | None = None
    sampler: str | Sampler = "uniform"
    state_placement: Placement = "auto"
    budget: Budget | Sequence[int] | np.ndarray | None = None
    donate_state: bool = False

    def __post_init__(self) -> None:
        check_round_options(self)


def check_round_options(o: RoundOptions) -> None:
    """Raise a ValueError for the first bad option, saying what was wrong and what to do."""
    if o.executor != "auto" and o.executor not in registry.REGISTRY:
        valid = ", ".join(("auto", *registry.REGISTRY))
        raise ValueError(f"Unknown executor {o.executor!r}; valid executors: {valid}.")
    if o.batch_size < 1 or o.local_epochs < 1:
        raise ValueError(
            f"batch_size and local_epochs must be >= 1, got {o.batch_size} and {o.local_epochs}."
        )
    for name in ("chunk_size", "num_groups", "steps_per_call", "cohort_size"):
        value: Any = getattr(o, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 (or None: the default), got {value}.")
    if o.client_threads is not None and o.client_threads < 1:
        raise ValueError(
            f"client_threads must be >= 1 (or None: 2 on a CPU with 2+ cores, else 1), got "
            f"{o.client_threads}."
        )
    if o.loop is not None:
        check_loop(o.loop)
    check_placement(o.state_placement)
    if isinstance(o.sampler, str):
        sampling.sampler_for(o.sampler, np.ones(1))  # raises, naming the valid samplers
    if o.cohort_size is None and (
        o.sampler != "uniform" or o.state_placement != "auto" or o.donate_state
    ):
        raise ValueError(
            "sampler, state_placement and donate_state apply to cohort rounds: set cohort_size."
        )
