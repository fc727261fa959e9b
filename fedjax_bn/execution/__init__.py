"""How clients run: the executor interface, the executors, the one local loop, batches, plans.

Algorithms own their math (``fedjax_bn.algorithms``); this package owns how a round's clients
are run (sequential, lockstep vmap / chunked, sharded, auto) and is the only place that does.
"""

from fedjax_bn.execution.batches import (
    batches_from_order,
    gather_batch,
    round_batches,
    steps_per_epoch,
    valid_steps,
)
from fedjax_bn.execution.cohort import CohortResult, CohortRound, size_bucket, size_buckets
from fedjax_bn.execution.lockstep import RoundResult, default_local_loop
from fedjax_bn.execution.loop import client_update, local_steps
from fedjax_bn.execution.plan import Plan, make_plan, padded_fraction, schedule
from fedjax_bn.execution.round import (
    EXECUTORS,
    Executor,
    Round,
    build_executor,
    choose_executor,
    make_round,
)

__all__ = [
    "batches_from_order",
    "EXECUTORS",
    "CohortResult",
    "CohortRound",
    "Executor",
    "Plan",
    "Round",
    "RoundResult",
    "build_executor",
    "choose_executor",
    "client_update",
    "default_local_loop",
    "gather_batch",
    "local_steps",
    "make_plan",
    "make_round",
    "padded_fraction",
    "round_batches",
    "schedule",
    "size_bucket",
    "size_buckets",
    "steps_per_epoch",
    "valid_steps",
]
