"""How a round's clients run: one pure client update, several executors.

- ``sequential``: clients one after another, local steps as jitted calls (``sequential.py``);
  the fast path on XLA:CPU, where the round costs what its plain train steps cost;
- ``vmap``: every client in one jitted, vmapped call (fills a GPU/TPU with many small clients);
- ``chunked``: vmap over chunks of ``chunk_size`` clients, looping over chunks inside the jit
  (``jax.lax.map(..., batch_size=k)``), to bound memory;
- ``sharded``: the client axis split over a device mesh, several GPUs/TPUs or hosts
  (``sharding.py``);
- ``auto``: picked per backend and cohort size by :func:`choose_executor`, from the benchmark
  (``experiments/bench.py``); the pick is logged and kept in ``Round.executor``.

All give the same new state and :class:`RoundResult` (up to float reassociation): the same
on-device batches (``data.round_batches``), no-op padded steps, the same aggregation. A round
never re-traces after its first call for the same data: every jitted function is built once.
"""

from __future__ import annotations

import logging
from typing import Literal

import jax
import numpy as np
from jax.sharding import Mesh

from fedjax_bn import client as client_lib
from fedjax_bn.algorithms import Algorithm, ServerState
from fedjax_bn.cohort import Plan, RoundResult, make_plan, padded_fraction
from fedjax_bn.data import ClientArrays
from fedjax_bn.sequential import SequentialRound
from fedjax_bn.sharding import client_mesh, constrain_state, sharded_runner
from fedjax_bn.vectorized import default_local_loop, lockstep_round, run_clients

__all__ = [
    "EXECUTORS",
    "Round",
    "RoundResult",
    "choose_executor",
    "default_local_loop",
    "make_round",
    "padded_fraction",
]

Array = jax.Array
ExecutorName = Literal["auto", "vmap", "chunked", "sequential", "sharded"]
EXECUTORS: tuple[str, ...] = ("auto", "vmap", "chunked", "sequential", "sharded")
# auto on an accelerator: vmap up to this many clients, chunks of AUTO_CHUNK_SIZE above it.
AUTO_VMAP_MAX_CLIENTS = 1024
AUTO_CHUNK_SIZE = 256
logger = logging.getLogger(__name__)


def choose_executor(
    num_clients: int, backend: str | None = None, device_count: int | None = None
) -> str:
    """``auto``'s pick: ``sequential`` on CPU (XLA:CPU's scan and vmapped convs are slow, see
    DESIGN.md); on GPU/TPU ``sharded`` over several devices, else ``vmap``, or ``chunked`` for a
    cohort above ``AUTO_VMAP_MAX_CLIENTS``."""
    backend = backend or jax.default_backend()
    device_count = jax.device_count() if device_count is None else device_count
    if backend == "cpu":
        return "sequential"
    if device_count > 1:
        return "sharded"
    return "vmap" if num_clients <= AUTO_VMAP_MAX_CLIENTS else "chunked"


class Round:
    """A round function ``(state, train_arrays, key) -> (state, RoundResult)``.

    Host-side it only reads the clients' sizes (once per data set, cached) to plan the steps;
    everything else stays on device. ``executor`` is the executor that runs (``auto`` resolved
    at the first call); ``padded_fraction(train)`` the share of no-op client-steps it runs.
    """

    def __init__(
        self,
        alg: Algorithm,
        *,
        executor: ExecutorName,
        batch_size: int,
        local_epochs: int,
        loop: client_lib.LocalLoop | None,
        chunk_size: int | None,
        num_groups: int,
        mesh: Mesh | None,
        steps_per_call: int,
    ) -> None:
        self.alg, self.requested = alg, executor
        self.batch_size, self.local_epochs = batch_size, local_epochs
        self.loop = loop or default_local_loop()
        self.chunk_size, self.num_groups, self.mesh = chunk_size, num_groups, mesh
        self.steps_per_call = steps_per_call
        self.executor: str | None = None if executor == "auto" else executor
        self._sizes_of: Array | None = None
        self._sizes: tuple[int, ...] = ()
        self._impl = None

    def sizes(self, train: ClientArrays) -> tuple[int, ...]:
        """Host copy of the clients' sizes, read once per ``train.n`` array."""
        if train.n is not self._sizes_of:
            self._sizes = tuple(int(n) for n in np.asarray(jax.device_get(train.n)))
            self._sizes_of = train.n
        return self._sizes

    def plan(self, train: ClientArrays) -> Plan:
        """The static step plan the lockstep executors run for this data."""
        multiple = self.mesh.size if self.executor == "sharded" and self.mesh else 1
        return make_plan(
            self.sizes(train),
            self.batch_size,
            self.local_epochs,
            train.y.shape[1],
            num_groups=self.num_groups if self.executor != "sharded" else 1,
            multiple=multiple,
        )

    def padded_fraction(self, train: ClientArrays) -> float:
        """Share of executed client-steps that are masked no-ops (0 for ``sequential``)."""
        self._resolve(train)
        return 0.0 if self.executor == "sequential" else self.plan(train).padded_fraction()

    def _resolve(self, train: ClientArrays) -> None:
        if self._impl is not None:
            return
        if self.executor is None:
            self.executor = choose_executor(int(train.n.shape[0]))
            logger.info("auto executor: %s on %s", self.executor, jax.default_backend())
        alg, chunk = self.alg, self.chunk_size
        if self.executor == "sequential":
            self._impl = SequentialRound(
                alg,
                batch_size=self.batch_size,
                local_epochs=self.local_epochs,
                steps_per_call=self.steps_per_call,
            )
            return
        if self.executor == "chunked" and chunk is None:
            chunk = AUTO_CHUNK_SIZE
        if self.executor == "vmap":
            chunk = None
        if self.executor == "sharded":
            self.mesh = self.mesh or client_mesh()
            run_group = sharded_runner(self.mesh, alg, self.loop, chunk)
        else:

            def run_group(group, state, inputs):
                return run_clients(alg, self.loop, chunk, group, state, inputs)

        mesh = self.mesh if self.executor == "sharded" else None

        def round_fn(plan: Plan, state: ServerState, train: ClientArrays, key: Array):
            new_state, result = lockstep_round(alg, plan, run_group, state, train, key)
            if mesh is not None and plan.num_clients % mesh.size == 0:
                new_state = constrain_state(new_state, mesh)
            return new_state, result

        self._impl = jax.jit(round_fn, static_argnums=0)

    def __call__(
        self, state: ServerState, train: ClientArrays, key: Array
    ) -> tuple[ServerState, RoundResult]:
        self._resolve(train)
        if self.executor == "sequential":
            return self._impl(state, train, key, self.sizes(train))
        return self._impl(self.plan(train), state, train, key)


def make_round(
    alg: Algorithm,
    *,
    executor: ExecutorName = "auto",
    batch_size: int = 32,
    local_epochs: int = 1,
    loop: client_lib.LocalLoop | None = None,
    chunk_size: int | None = None,
    num_groups: int = 1,
    mesh: Mesh | None = None,
    steps_per_call: int = 1,
) -> Round:
    """A round function ``(state, train_arrays, key) -> (state, RoundResult)``.

    ``loop``: local steps as ``scan`` or ``unroll`` (default: unroll on CPU, scan elsewhere);
    ``chunk_size``: clients per chunk for ``chunked`` (default ``AUTO_CHUNK_SIZE``);
    ``num_groups``: lockstep executors split the cohort into this many groups of similar size
    to cut padded steps; ``mesh``: devices for ``sharded`` (default: all);
    ``steps_per_call``: full steps unrolled into one jitted call by ``sequential``.
    """
    if batch_size < 1 or local_epochs < 1:
        raise ValueError(
            f"batch_size and local_epochs must be >= 1, got {batch_size} and {local_epochs}."
        )
    if executor not in EXECUTORS:
        raise ValueError(f"Unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}.")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if num_groups < 1 or steps_per_call < 1:
        raise ValueError(
            f"num_groups and steps_per_call must be >= 1, got {num_groups}, {steps_per_call}."
        )
    if loop not in (None, "scan", "unroll"):
        raise ValueError(f"Unknown local loop {loop!r}; use 'scan' or 'unroll'.")
    return Round(
        alg,
        executor=executor,
        batch_size=batch_size,
        local_epochs=local_epochs,
        loop=loop,
        chunk_size=chunk_size,
        num_groups=num_groups,
        mesh=mesh,
        steps_per_call=steps_per_call,
    )
