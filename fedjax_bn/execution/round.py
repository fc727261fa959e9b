"""A round of every client: ``make_round(alg, options)`` without a cohort size.

Every executor (``registry.py``) gives the same new state and :class:`RoundResult` (up to
float reassociation): the same on-device batches (``batches.round_batches``), no-op padded
steps, the same aggregation. A round never re-traces after its first call for the same data:
every jitted function is built once.

- ``sequential``: clients one after another (two lanes at once on a CPU), local steps as
  jitted calls (``sequential.py``); the fast path on XLA:CPU, where a round costs less than
  its plain train steps run one after another;
- ``vmap``: every client in one jitted, vmapped call (fills a GPU/TPU with many small clients);
- ``chunked``: vmap over chunks of ``chunk_size`` clients, looping over chunks inside the jit
  (``jax.lax.map(..., batch_size=k)``), to bound memory (both ``lockstep.py``);
- ``sharded``: the client axis split over a device mesh, several GPUs/TPUs or hosts
  (``sharded.py``);
- ``auto``: picked per backend and cohort size by ``registry.choose_executor``, from the
  benchmark (``benchmarks/bench.py``); the pick is logged and kept in ``Round.executor``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_bn.algorithms.base import FedState
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution.batches import steps_per_epoch
from fedjax_bn.execution.executor import RoundResult
from fedjax_bn.execution.stages import Stages

Array = jax.Array


class Round:
    """A round function ``(state, train_arrays, key) -> (state, RoundResult)``.

    Host-side it reads the clients' sizes and checks the labels once per data set (cached on
    the ``train.n`` array); everything else stays on device. ``executor`` is the executor that
    runs (``auto`` resolved at the first call); ``padded_fraction(train)`` the share of no-op
    client-steps it runs (budgets not counted). ``options.budget``: each client's most local
    steps per round (``fedjax_bn.budgets``), drawn from the round key's ``BUDGET_STREAM``.
    """

    def __init__(self, stages: Stages) -> None:
        self.stages, self.alg, self.options = stages, stages.alg, stages.options
        self.requested = stages.options.executor

    @property
    def executor(self) -> str | None:
        """The executor that runs (``auto`` resolved at the first call)."""
        return self.stages.executor

    def padded_fraction(self, train: ClientArrays) -> float:
        """Share of executed client-steps that are masked no-ops (0 for ``sequential``)."""
        impl = self.stages.executor_for(int(train.n.shape[0]))
        return impl.padded_fraction(self.stages.sizes(train), train.n_max)

    def __call__(
        self, state: FedState, train: ClientArrays, key: Array, batches: Any = None
    ) -> tuple[FedState, RoundResult]:
        """One round; ``batches`` (from ``batches.batches_from_order``) replaces the shuffle by
        ``key`` with a given batch order, e.g. to follow another framework's batches."""
        sizes = self.stages.sizes(train)
        if batches is not None:
            want = self.batch_shape(train)
            got = tuple(jnp.shape(batches[0]))
            if got != want or tuple(jnp.shape(batches[1])) != want:
                raise ValueError(
                    f"given batches have shape {got}, expected {want} [clients, epochs * "
                    "ceil(n_max / batch_size), batch_size]: build them with "
                    "fedjax_bn.execution.batches_from_order(orders, n_max, batch_size)."
                )
        budget = self.stages.draw_budget(key, state.round, len(sizes))
        impl = self.stages.executor_for(len(sizes), state.round)
        wire = self.stages.wire(state)
        new, result = impl(state, train, key, sizes, batches, budget)
        return new, self.stages.with_bytes(wire, result, len(sizes))

    def batch_shape(self, train: ClientArrays) -> tuple[int, int, int]:
        """The ``[C, S, B]`` shape of a round's batch indices for ``train``."""
        b, e = self.options.batch_size, self.options.local_epochs
        return (int(train.n.shape[0]), e * steps_per_epoch(int(train.n_max), b), b)
