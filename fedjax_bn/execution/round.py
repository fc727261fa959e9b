"""Rounds: ``make_round(alg, executor=...)`` and the executor interface behind it.

An executor is a callable ``(state, train, key, sizes) -> (state, RoundResult)`` that runs one
round of any :class:`~fedjax_bn.algorithms.Algorithm` through its pure client functions:

- ``sequential``: clients one after another (two lanes at once on a CPU), local steps as
  jitted calls (``sequential.py``); the fast path on XLA:CPU, where a round costs less than
  its plain train steps run one after another;
- ``vmap``: every client in one jitted, vmapped call (fills a GPU/TPU with many small clients);
- ``chunked``: vmap over chunks of ``chunk_size`` clients, looping over chunks inside the jit
  (``jax.lax.map(..., batch_size=k)``), to bound memory;
- ``sharded``: the client axis split over a device mesh, several GPUs/TPUs or hosts
  (``sharded.py``);
- ``auto``: picked per backend and cohort size by :func:`choose_executor`, from the benchmark
  (``benchmarks/bench.py``); the pick is logged and kept in ``Round.executor``.

With ``cohort_size=K`` a round trains a sampled cohort of the population instead of every
client (``cohort.py``; samplers in ``fedjax_bn.sampling``, client state placement in
``store.py``); without it a round is exactly what it was.

All give the same new state and :class:`RoundResult` (up to float reassociation): the same
on-device batches (``batches.round_batches``), no-op padded steps, the same aggregation. A
round never re-traces after its first call for the same data: every jitted function is built
once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedjax_bn import budgets
from fedjax_bn.algorithms.base import Algorithm, FedState, stage_at, task_of
from fedjax_bn.budgets import Budget
from fedjax_bn.data import ClientArrays, check_client_labels
from fedjax_bn.execution.batches import steps_per_epoch
from fedjax_bn.execution.cohort import BUDGET_STREAM, CohortRound
from fedjax_bn.execution.lockstep import (
    GroupRunner,
    RoundResult,
    default_local_loop,
    lockstep_round,
    run_clients,
)
from fedjax_bn.execution.loop import LocalLoop, check_loop
from fedjax_bn.execution.plan import Plan, make_plan
from fedjax_bn.execution.sequential import SequentialRound
from fedjax_bn.execution.sharded import client_mesh, constrain_state, sharded_runner
from fedjax_bn.execution.store import Placement, check_placement
from fedjax_bn.sampling import Sampler

Array = jax.Array
ExecutorName = Literal["auto", "vmap", "chunked", "sequential", "sharded"]
EXECUTORS: tuple[str, ...] = ("auto", "vmap", "chunked", "sequential", "sharded")
# auto on an accelerator: vmap up to this many clients, chunks of AUTO_CHUNK_SIZE above it.
AUTO_VMAP_MAX_CLIENTS = 1024
AUTO_CHUNK_SIZE = 256
logger = logging.getLogger(__name__)


class Executor(Protocol):
    """Runs one round of a cohort whose host-side sizes are ``sizes``; ``budget``: each
    client's most local steps (host int32 ``[C]``, ``fedjax_bn.budgets``), None: no limit;
    ``ids``: the slots' population ids, which key their steps' randomness (None: ``0..C-1``)."""

    def __call__(
        self,
        state: FedState,
        train: ClientArrays,
        key: Array,
        sizes: tuple[int, ...],
        batches: Any = None,
        budget: np.ndarray | None = None,
        ids: np.ndarray | None = None,
    ) -> tuple[FedState, RoundResult]: ...


def choose_executor(
    num_clients: int, backend: str | None = None, device_count: int | None = None
) -> str:
    """``auto``'s pick: ``sequential`` on CPU (XLA:CPU's scan and vmapped convs are slow, see
    ``docs/design.md``); on GPU/TPU ``sharded`` over several devices, else ``vmap``, or
    ``chunked`` for a cohort above ``AUTO_VMAP_MAX_CLIENTS``."""
    backend = backend or jax.default_backend()
    device_count = jax.device_count() if device_count is None else device_count
    if backend == "cpu":
        return "sequential"
    if device_count > 1:
        return "sharded"
    return "vmap" if num_clients <= AUTO_VMAP_MAX_CLIENTS else "chunked"


class LockstepRound:
    """The vmap / chunked / sharded executors: one jitted round per static step plan."""

    def __init__(
        self,
        alg: Algorithm,
        run_group: GroupRunner,
        *,
        batch_size: int,
        local_epochs: int,
        num_groups: int,
        mesh: Mesh | None,
    ) -> None:
        self.batch_size, self.local_epochs = batch_size, local_epochs
        self.num_groups, self.mesh = num_groups, mesh

        def round_fn(
            plan: Plan,
            state: FedState,
            train: ClientArrays,
            key: Array,
            batches: Any,
            budget: Any,
            ids: Any,
        ):
            new_state, result = lockstep_round(
                alg, plan, run_group, state, train, key, batches, budget, ids
            )
            if mesh is not None and plan.num_clients % mesh.size == 0:
                new_state = constrain_state(new_state, mesh)
            return new_state, result

        self._round = jax.jit(round_fn, static_argnums=0)

    def plan(self, sizes: tuple[int, ...], n_max: int) -> Plan:
        """The static step plan for these client sizes."""
        multiple = self.mesh.size if self.mesh is not None else 1
        groups = self.num_groups if self.mesh is None else 1
        return make_plan(
            sizes, self.batch_size, self.local_epochs, n_max, num_groups=groups, multiple=multiple
        )

    def __call__(
        self,
        state: FedState,
        train: ClientArrays,
        key: Array,
        sizes: tuple[int, ...],
        batches: Any = None,
        budget: np.ndarray | None = None,
        ids: np.ndarray | None = None,
    ) -> tuple[FedState, RoundResult]:
        budget_C = None if budget is None else jnp.asarray(budget, jnp.int32)  # data: no re-jit
        ids_C = None if ids is None else jnp.asarray(ids, jnp.int32)
        plan = self.plan(sizes, train.n_max)
        return self._round(plan, state, train, key, batches, budget_C, ids_C)


def build_executor(
    name: str,
    alg: Algorithm,
    *,
    batch_size: int,
    local_epochs: int,
    loop: LocalLoop,
    chunk_size: int | None,
    num_groups: int,
    mesh: Mesh | None,
    steps_per_call: int,
    client_threads: int | None = None,
) -> Executor:
    """The executor ``name`` (not ``auto``) for ``alg``, its jitted functions built once."""
    if name == "sequential":
        return SequentialRound(
            alg,
            batch_size=batch_size,
            local_epochs=local_epochs,
            steps_per_call=steps_per_call,
            client_threads=client_threads,
        )
    if name == "chunked" and chunk_size is None:
        chunk_size = AUTO_CHUNK_SIZE
    if name == "vmap":
        chunk_size = None
    if name == "sharded":
        mesh = mesh or client_mesh()
        run_group = sharded_runner(mesh, alg, loop, chunk_size)
    else:
        mesh = None

        def run_group(group, server, inputs):
            return run_clients(alg, loop, chunk_size, group, server, inputs)

    return LockstepRound(
        alg,
        run_group,
        batch_size=batch_size,
        local_epochs=local_epochs,
        num_groups=num_groups,
        mesh=mesh,
    )


def num_outputs(alg: Algorithm, train: ClientArrays) -> int | None:
    """The model's number of outputs (classes), from shapes only (nothing compiles); None
    when its output is not one array."""
    task = task_of(alg)
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[2:]), a.dtype), train.x)

    def outputs(x: Any) -> Any:
        return task.outputs(task.init(jax.random.key(0), x), x)

    out = jax.eval_shape(outputs, x)
    return int(out.shape[-1]) if isinstance(out, jax.ShapeDtypeStruct) and out.ndim else None


class Round:
    """A round function ``(state, train_arrays, key) -> (state, RoundResult)``.

    Host-side it reads the clients' sizes and checks the labels once per data set (cached on
    the ``train.n`` array); everything else stays on device. ``executor`` is the executor that
    runs (``auto`` resolved at the first call); ``padded_fraction(train)`` the share of no-op
    client-steps it runs (budgets not counted). ``budget``: each client's most local steps per
    round (``fedjax_bn.budgets``), drawn from the round key's ``BUDGET_STREAM``.
    """

    def __init__(
        self, alg: Algorithm, executor: ExecutorName, budget: Budget | None = None, **options: Any
    ) -> None:
        self.alg, self.requested, self.options = alg, executor, options
        self.budget = budget
        self.executor: str | None = None if executor == "auto" else executor
        self._sizes_of: Array | None = None
        self._sizes: tuple[int, ...] = ()
        self._impls: dict[int, Executor] = {}  # one per stage of the algorithm
        self._num_outputs: dict[Any, int] = {}

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

    def _resolve(self, train: ClientArrays, round_: Any = 0) -> Executor:
        if self.executor is None:
            self.executor = choose_executor(int(train.n.shape[0]))
            logger.info("auto executor: %s on %s", self.executor, jax.default_backend())
        index, alg = stage_at(self.alg, round_)
        if index not in self._impls:
            self._impls[index] = build_executor(self.executor, alg, **self.options)
        return self._impls[index]

    def executor_for(self, train: ClientArrays, round_: Any = 0) -> Executor:
        """The executor that runs round ``round_`` on ``train`` (``auto`` resolved by its
        cohort size; the algorithm's stage by the round)."""
        return self._resolve(train, round_)

    def padded_fraction(self, train: ClientArrays) -> float:
        """Share of executed client-steps that are masked no-ops (0 for ``sequential``)."""
        impl = self._resolve(train)
        if not isinstance(impl, LockstepRound):
            return 0.0
        return impl.plan(self.sizes(train), train.n_max).padded_fraction()

    def __call__(
        self, state: FedState, train: ClientArrays, key: Array, batches: Any = None
    ) -> tuple[FedState, RoundResult]:
        """One round; ``batches`` (from ``batches.batches_from_order``) replaces the shuffle by
        ``key`` with a given batch order, e.g. to follow another framework's batches."""
        sizes = self.sizes(train)
        if batches is not None:
            want = self.batch_shape(train)
            got = tuple(jnp.shape(batches[0]))
            if got != want or tuple(jnp.shape(batches[1])) != want:
                raise ValueError(
                    f"given batches have shape {got}, expected {want} [clients, epochs * "
                    "ceil(n_max / batch_size), batch_size]: build them with "
                    "fedjax_bn.execution.batches_from_order(orders, n_max, batch_size)."
                )
        budget = self.draw_budget(key, state.round, len(sizes))
        return self._resolve(train, state.round)(state, train, key, sizes, batches, budget)

    def draw_budget(self, key: Array, round_: Array, num_clients: int) -> np.ndarray | None:
        """This round's host budgets for ``num_clients`` clients (None without a budget), from
        the ``BUDGET_STREAM`` of the round key (the batches' shuffle is left as it was)."""
        stream = None if self.budget is None else jax.random.fold_in(key, BUDGET_STREAM)
        return budgets.draw(self.budget, stream, round_, num_clients)

    def batch_shape(self, train: ClientArrays) -> tuple[int, int, int]:
        """The ``[C, S, B]`` shape of a round's batch indices for ``train``."""
        b, e = self.options["batch_size"], self.options["local_epochs"]
        return (int(train.n.shape[0]), e * steps_per_epoch(int(train.n_max), b), b)


def make_round(
    alg: Algorithm,
    *,
    executor: ExecutorName = "auto",
    batch_size: int = 32,
    local_epochs: int = 1,
    loop: LocalLoop | None = None,
    chunk_size: int | None = None,
    num_groups: int = 1,
    mesh: Mesh | None = None,
    steps_per_call: int = 1,
    client_threads: int | None = None,
    cohort_size: int | None = None,
    sampler: str | Sampler = "uniform",
    state_placement: Placement = "auto",
    budget: Budget | Sequence[int] | np.ndarray | None = None,
    donate_state: bool = False,
) -> Round | CohortRound:
    """A round function ``(state, train_arrays, key) -> (state, RoundResult)``.

    ``loop``: local steps as ``scan`` or ``unroll`` (default: unroll on CPU, scan elsewhere);
    ``chunk_size``: clients per chunk for ``chunked`` (default ``AUTO_CHUNK_SIZE``);
    ``num_groups``: lockstep executors split the cohort into this many groups of similar size
    to cut padded steps; ``mesh``: devices for ``sharded`` (default: all);
    ``steps_per_call``: full steps unrolled into one jitted call by ``sequential``;
    ``client_threads``: host threads that run ``sequential``'s clients concurrently (default
    2 on a CPU with 2+ cores, else 1; the result is bitwise the same for any number).

    ``cohort_size``: train a sampled cohort of this many clients of the population each round
    (a :class:`~fedjax_bn.execution.cohort.CohortRound`, returning a ``CohortResult``); None:
    every client, every round. ``sampler``: ``"uniform"``, ``"by_size"`` or a
    :data:`~fedjax_bn.sampling.Sampler`; ``state_placement``: the population's client state
    on the ``"device"``, the ``"host"`` (numpy) or ``"auto"`` (``execution/store.py``).
    ``donate_state``: a cohort round writes the cohort's rows into the population's client
    state in place (O(K) a round instead of a copy of all N rows), so the state passed in must
    not be used again: ``state, result = round_fn(state, ...)`` as a training loop does.

    ``budget``: stragglers, each client's most local steps per round (``fedjax_bn.budgets``):
    None (no limit), one int per client (fixed; with ``cohort_size`` one per population id) or
    a :data:`~fedjax_bn.budgets.Budget` drawn per round, e.g. ``budgets.uniform_steps(1, 5)``.
    Steps past it are masked (lockstep executors) or skipped (``sequential``); a client's
    weight stays its size ``n_c``, 0 with budget 0.
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
    if client_threads is not None and client_threads < 1:
        raise ValueError(
            f"client_threads must be >= 1 (or None: 2 on a CPU with 2+ cores, else 1), got "
            f"{client_threads}."
        )
    if loop is not None:
        check_loop(loop)
    check_placement(state_placement)
    if cohort_size is None and (sampler != "uniform" or state_placement != "auto" or donate_state):
        raise ValueError(
            "sampler, state_placement and donate_state apply to cohort rounds: set cohort_size."
        )
    rnd = Round(
        alg,
        executor,
        budgets.as_budget(budget),
        batch_size=batch_size,
        local_epochs=local_epochs,
        loop=loop or default_local_loop(),
        chunk_size=chunk_size,
        num_groups=num_groups,
        mesh=mesh,
        steps_per_call=steps_per_call,
        client_threads=client_threads,
    )
    if cohort_size is None:
        return rnd
    return CohortRound(
        rnd,
        cohort_size=cohort_size,
        sampler=sampler,
        state_placement=state_placement,
        donate_state=donate_state,
    )
