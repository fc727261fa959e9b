"""How clients run: the executor interface, the executors, the one local loop, batches, plans.

Algorithms own their math (``fedjax_bn.algorithms``); this package owns how a round's clients
are run (sequential, lockstep vmap / chunked, sharded, auto) and is the only place that does.
``make_round(alg, RoundOptions(...))`` builds a round (``build.py``); an executor is one module
plus one line in ``registry.py``.
"""

from fedjax_bn.execution.batches import (
    batches_from_order,
    gather_batch,
    round_batches,
    steps_per_epoch,
    valid_steps,
)
from fedjax_bn.execution.build import make_round
from fedjax_bn.execution.cohort import CohortResult, CohortRound, size_bucket, size_buckets
from fedjax_bn.execution.executor import Executor, RoundResult
from fedjax_bn.execution.lockstep import (
    ChunkedExecutor,
    LockstepExecutor,
    VmapExecutor,
    default_local_loop,
)
from fedjax_bn.execution.loop import client_update, local_steps
from fedjax_bn.execution.options import RoundOptions
from fedjax_bn.execution.plan import Plan, make_plan, padded_fraction, schedule
from fedjax_bn.execution.registry import EXECUTORS, REGISTRY, build_executor, choose_executor
from fedjax_bn.execution.round import Round
from fedjax_bn.execution.sequential import SequentialExecutor
from fedjax_bn.execution.sharded import ShardedExecutor
from fedjax_bn.execution.stages import Stages

__all__ = [
    "batches_from_order",
    "EXECUTORS",
    "ChunkedExecutor",
    "CohortResult",
    "CohortRound",
    "Executor",
    "LockstepExecutor",
    "Plan",
    "REGISTRY",
    "Round",
    "RoundOptions",
    "RoundResult",
    "SequentialExecutor",
    "ShardedExecutor",
    "Stages",
    "VmapExecutor",
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
