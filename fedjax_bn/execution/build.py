"""``make_round``: a round function from an algorithm and its :class:`RoundOptions`."""

from __future__ import annotations

import dataclasses
from typing import Any

from fedjax_bn.algorithms.base import Algorithm
from fedjax_bn.execution.cohort import CohortRound
from fedjax_bn.execution.options import RoundOptions
from fedjax_bn.execution.round import Round
from fedjax_bn.execution.stages import Stages


def make_round(
    alg: Algorithm, options: RoundOptions | None = None, **overrides: Any
) -> Round | CohortRound:
    """A round function ``(state, train_arrays, key) -> (state, RoundResult)``.

    ``options`` (default ``RoundOptions()``) with any of its fields overridden by keyword, e.g.
    ``make_round(alg, executor="sequential", batch_size=16)`` (the fields and their defaults:
    :class:`RoundOptions`). With ``cohort_size`` a :class:`~fedjax_bn.execution.cohort.
    CohortRound` trains a sampled cohort of the population each round, else a
    :class:`~fedjax_bn.execution.round.Round` trains every client.
    """
    options = dataclasses.replace(options or RoundOptions(), **overrides)
    stages = Stages(alg, options)
    if options.cohort_size is None:
        return Round(stages)
    return CohortRound(
        stages,
        cohort_size=options.cohort_size,
        sampler=options.sampler,
        state_placement=options.state_placement,
        donate_state=options.donate_state,
    )
