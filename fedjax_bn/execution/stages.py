"""What a plain round and a cohort round share: their executors, one per stage of the
algorithm, built once (``auto`` resolved at the first use), the clients' sizes read and checked
once per data set, and the budgets drawn each round.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import numpy as np

from fedjax_bn import budgets
from fedjax_bn.algorithms.base import Algorithm, FedState, stage_at, task_of
from fedjax_bn.compress.wire import WireBytes, client_bytes, slot_bytes
from fedjax_bn.data import ClientArrays, check_client_labels
from fedjax_bn.execution.executor import Executor, RoundResult
from fedjax_bn.execution.options import RoundOptions
from fedjax_bn.execution.registry import build_executor, choose_executor
from fedjax_bn.execution.streams import BUDGET_STREAM

Array = jax.Array
logger = logging.getLogger(__name__)


def num_outputs(alg: Algorithm, train: ClientArrays) -> int | None:
    """The model's number of outputs (classes), from shapes only (nothing compiles); None
    when its output is not one array."""
    task = task_of(alg)
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[2:]), a.dtype), train.x)

    def outputs(x: Any) -> Any:
        return task.outputs(task.init(jax.random.key(0), x), x)

    out = jax.eval_shape(outputs, x)
    return int(out.shape[-1]) if isinstance(out, jax.ShapeDtypeStruct) and out.ndim else None


class Stages:
    """The executors that run ``alg`` under ``options``; ``executor`` is their name (``auto``
    resolved at the first :meth:`executor_for`), ``budget`` the options' budget as a
    :data:`~fedjax_bn.budgets.Budget`."""

    def __init__(self, alg: Algorithm, options: RoundOptions) -> None:
        self.alg, self.options = alg, options
        self.budget = budgets.as_budget(options.budget)
        self.executor: str | None = None if options.executor == "auto" else options.executor
        self._sizes_of: Array | None = None
        self._sizes: tuple[int, ...] = ()
        self._impls: dict[int, Executor] = {}  # one per stage of the algorithm
        self._num_outputs: dict[Any, int | None] = {}
        self._wire: WireBytes | None = None  # bytes per client, from the first state's shapes

    def sizes(self, train: ClientArrays) -> tuple[int, ...]:
        """Host copy of the clients' sizes, read and checked once per ``train.n`` array."""
        if train.n is not self._sizes_of:
            sizes = tuple(int(n) for n in np.asarray(jax.device_get(train.n)))
            if sum(sizes) <= 0:
                raise ValueError(
                    "every client of the round has zero training examples: nothing to train "
                    "on (check the partition, or pass clients that hold data)."
                )
            if task_of(self.alg).classification:
                shape = jax.tree.map(lambda a: (a.shape[2:], a.dtype), train.x)
                key = str(shape)
                if key not in self._num_outputs:  # traces the model once per example shape
                    self._num_outputs[key] = num_outputs(self.alg, train)
                if self._num_outputs[key] is not None:
                    check_client_labels(train, self._num_outputs[key])
            self._sizes, self._sizes_of = sizes, train.n
        return self._sizes

    def executor_for(self, num_clients: int, round_: Any = 0) -> Executor:
        """The executor that runs round ``round_`` of ``num_clients`` clients (``auto``
        resolved by that cohort size at the first call; the algorithm's stage by the round)."""
        if self.executor is None:
            self.executor = choose_executor(num_clients)
            logger.info("auto executor: %s on %s", self.executor, jax.default_backend())
        index, alg = stage_at(self.alg, round_)
        if index not in self._impls:
            self._impls[index] = build_executor(self.executor, alg, self.options)
        return self._impls[index]

    def wire(self, state: FedState) -> WireBytes:
        """The bytes one client sends and receives a round, read from ``state``'s shapes at
        the first call (before any executor may donate its buffers)."""
        if self._wire is None:
            self._wire = client_bytes(self.alg, state)
        return self._wire

    def with_bytes(self, wire: WireBytes, result: RoundResult, population: int) -> RoundResult:
        """``result`` with each slot's uplink and downlink bytes (``compress/wire.py``)."""
        up, down = slot_bytes(wire, result.num_seen, result.clients, population)
        return result._replace(uplink_bytes=up, downlink_bytes=down)

    def draw_budget(self, key: Array, round_: Array, num_clients: int) -> np.ndarray | None:
        """This round's host budgets for ``num_clients`` clients (None without a budget), from
        the ``BUDGET_STREAM`` of the round key (the batches' shuffle is left as it was)."""
        stream = None if self.budget is None else jax.random.fold_in(key, BUDGET_STREAM)
        return budgets.draw(self.budget, stream, round_, num_clients)
