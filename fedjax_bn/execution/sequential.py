"""The sequential executor: clients one after another (in a lane per host thread), local steps
as jitted calls.

This is the fast path on XLA:CPU, which has two traps measured in ``docs/design.md``:
convolution gradients inside a while loop (``lax.scan``) run several times slower, and
vmapped per-client convs slower too. Here nothing loops on device: the host walks a schedule built
once from the clients' sizes (``plan.schedule``) and dispatches jitted calls that each run
``steps_per_call`` unrolled steps of the one local loop (``loop.local_steps``).

- Only real steps run: a client's no-op (fully padded) steps are skipped, not masked, and
  so are the steps past its budget (``fedjax_bn.budgets``: its schedule is cut short).
- Full batches run with no mask at all, so a step costs what a plain jitted train step costs;
  only a client's last, partial batch per epoch is masked.
- A client's last call runs ``client_final``, writes the outputs in place into a donated,
  stacked buffer, and starts the lane's next client (``client_init``): only a lane's first
  client is started by a call of its own, so the calls that hold a train step come in two
  kinds for one local epoch (full, and masked + closing; ``plan.dispatches``) and compile
  time and memory do not grow with the cohort.
- Data and batch indices stay on device; the only host data is the clients' sizes (cached).
- Every jitted function is built once, in the constructor, so rounds never re-trace.
- One step per call by default: on XLA:CPU a jit of 5 unrolled steps measured ~17% slower
  than 5 single-step calls (``steps_per_call`` exists to re-measure elsewhere).
- ``client_threads`` host threads run the clients, split into lanes of similar step counts
  (``plan.lanes``): on the 2-core CPU two independent train steps in flight at once ran
  1.15-1.85x the throughput of one (``docs/startup.md``). Each lane writes its clients' outputs
  into a stacked buffer of its own, and ``finish`` takes each client's row from its lane's
  buffer, so the result is bitwise that of one thread. Worker threads see jax's global config,
  not a thread-local context (``with jax.default_device(...)`` and the like).
- The extra lanes run on one process-wide pool per lane count (:func:`lane_pool`), not a pool
  per executor: a process that builds many rounds (tests, sweeps) holds a fixed number of idle
  threads, whether or not the rounds it dropped have been garbage collected.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn.algorithms.base import Algorithm, FedState, init_compiler_options
from fedjax_bn.budgets import budget_weights
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution.batches import round_batches
from fedjax_bn.execution.executor import RoundResult
from fedjax_bn.execution.lockstep import Outputs
from fedjax_bn.execution.loop import client_key, local_steps
from fedjax_bn.execution.plan import Dispatch, dispatches, lanes, schedule
from fedjax_bn.execution.quarantine import aggregate_round
from fedjax_bn.tree import put_client, take_client

if TYPE_CHECKING:
    from fedjax_bn.execution.options import RoundOptions

Array = jax.Array
OPEN = Dispatch(0, 0, False, True, False)  # a lane's first client: start it, no steps


class CallKind(NamedTuple):
    """What one jitted call does (static: each kind compiles once): ``steps`` steps,
    ``masked`` (a partial batch), ``opens`` (start the client from the state first),
    ``closes`` (then finish it and start the lane's next client)."""

    steps: int
    masked: bool
    opens: bool
    closes: bool


class RoundData(NamedTuple):
    """The round's on-device data that every call reads: the clients' examples, their batch
    indices and masks ``[C, S, B]``, the round key and the clients' population ids."""

    x_CN: Any
    y_CN: Any
    idx_CSB: Array
    mask_CSB: Array
    key: Array
    ids_C: Array


def default_client_threads(backend: str | None = None) -> int:
    """Host threads for ``sequential``: 2 on a CPU with at least 2 cores (measured faster
    there), else 1 (one device stream; not measured to help on GPU/TPU)."""
    if (backend or jax.default_backend()) != "cpu":
        return 1
    return min(2, os.cpu_count() or 1)


@functools.cache
def lane_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    """The process-wide pool of ``workers`` host threads that runs sequential executors' extra
    lanes (a lane job never waits on another, so rounds sharing it cannot deadlock)."""
    return concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fedjax_bn-lane")


def select_rows(owner_C: Array, buffers: tuple[Any, ...]) -> Any:
    """Stacked trees merged row by row: row ``c`` from ``buffers[owner_C[c]]``."""
    if len(buffers) == 1:
        return buffers[0]

    def pick(*leaves: Array) -> Array:
        owner = owner_C.reshape((-1,) + (1,) * (leaves[0].ndim - 1))
        out = leaves[0]
        for k, leaf in enumerate(leaves[1:], start=1):
            out = jnp.where(owner == k, leaf, out)
        return out

    return jax.tree.map(pick, *buffers)


def begin_buffers(
    alg: Algorithm, state: FedState, num_clients: int, num_lanes: int
) -> tuple[Outputs, ...]:
    """Each lane's stacked output buffer: the first holds the outputs every client starts from
    (a client with no data reports its starting model and keeps its state), the others zeros
    (only the rows of their lane's clients are read)."""
    start = jax.vmap(
        lambda cl: alg.client_final(alg.client_init(state.server, cl)),
        axis_size=num_clients,  # clients may be an empty tree (fedavg)
    )
    finals = start(state.clients)
    spare = tuple(jax.tree.map(jnp.zeros_like, finals) for _ in range(num_lanes - 1))
    return (finals, *spare)


def client_call(
    alg: Algorithm,
    kind: CallKind,
    state: FedState | None,
    carry: Any,
    finals: Outputs | None,
    data: RoundData,
    c: Array,
    s: Array,
    c_next: Array | None,
) -> Any:
    """``kind.steps`` steps of client ``c`` from step ``s``; opening and closing as ``kind``
    says (closing writes the client's outputs into the donated ``finals`` and starts client
    ``c_next``, returning both)."""
    if kind.opens:
        carry = alg.client_init(state.server, take_client(state.clients, c))
    if kind.steps:
        num = kind.steps
        idx_SB = jax.lax.dynamic_slice_in_dim(data.idx_CSB[c], s, num)
        mask_SB = jax.lax.dynamic_slice_in_dim(data.mask_CSB[c], s, num)
        x_N, y_N = jax.tree.map(lambda a: a[c], (data.x_CN, data.y_CN))
        carry = local_steps(
            alg.client_step,
            carry,
            x_N,
            y_N,
            idx_SB,
            mask_SB,
            full=0 if kind.masked else num,
            key=client_key(data.key, data.ids_C[c]),
            first=s,
        )
    if not kind.closes:
        return carry
    finals = put_client(finals, c, alg.client_final(carry))
    return finals, alg.client_init(state.server, take_client(state.clients, c_next))


def finish_round(
    alg: Algorithm,
    state: FedState,
    buffers: tuple[Outputs, ...],
    owner_C: Array | None,
    n_C: Array,
    ids_C: Array,
) -> tuple[FedState, RoundResult]:
    """The lanes' outputs merged and aggregated into the new state and the round's result."""
    finals = select_rows(owner_C, buffers)
    server, clients, bad = aggregate_round(alg, state.server, state.clients, finals, n_C)
    return FedState(server, clients, state.round + 1), RoundResult(*finals[2], bad, ids_C)


class SequentialExecutor:
    """``(state, train, key, sizes) -> (state, RoundResult)``, clients one after another in
    each of ``client_threads`` lanes."""

    exact_sizes = True  # compiles per N_max bucket and call kind, never per size

    def __init__(self, alg: Algorithm, options: RoundOptions) -> None:
        batch_size, local_epochs = options.batch_size, options.local_epochs
        self.alg, self.batch_size, self.epochs = alg, batch_size, local_epochs
        self.steps_per_call = options.steps_per_call or 1
        self.client_threads = options.client_threads or default_client_threads()
        self._compiled: set[tuple] = set()  # call kinds (and data shapes) compiled
        self._compile_lock = threading.Lock()
        # Built once: rounds never re-trace. ``finals`` is donated, so writing a client's
        # outputs into it is in place, and compile cost does not grow with the cohort.
        self._begin = jax.jit(functools.partial(begin_buffers, alg), static_argnums=(1, 2))
        # The shuffle is integer arithmetic and sorting only, so a lower LLVM level gives the
        # same bits by construction, and compiles faster (``docs/startup.md``).
        self._shuffle = jax.jit(
            lambda key, n_C, n_max: round_batches(key, n_C, n_max, batch_size, local_epochs),
            static_argnums=2,
            compiler_options=init_compiler_options(),
        )
        self._call = jax.jit(
            functools.partial(client_call, alg), static_argnums=0, donate_argnums=3
        )
        # Not donated: the stacked outputs share no shape with the new state's leaves, so XLA
        # could reuse few of them (jax warns "Some donated buffers were not usable").
        self._finish = jax.jit(functools.partial(finish_round, alg))
        self._schedule = functools.lru_cache(maxsize=64)(self._build_schedule)
        self._ids = functools.lru_cache(maxsize=8)(
            lambda num: jax.device_put(np.arange(num, dtype=np.int32))
        )

    def padded_fraction(self, sizes: tuple[int, ...], n_max: int) -> float:
        """0: no-op steps are skipped, not run."""
        return 0.0

    def _build_schedule(
        self, sizes: tuple[int, ...], n_max: int, budget: tuple[int, ...] | None
    ) -> tuple[tuple[list[Dispatch], ...], tuple[tuple[int, ...], ...], Array | None]:
        """Each client's dispatches, the lanes of clients, and which lane holds client c's
        outputs (on device, cached with the schedule; None with one lane)."""
        per_client = budget or (None,) * len(sizes)
        plans = tuple(
            dispatches(schedule(n, n_max, self.batch_size, self.epochs, self.steps_per_call, b))
            for n, b in zip(sizes, per_client, strict=True)
        )
        steps = [sum(d.steps for d in p) for p in plans]
        groups = lanes(steps, self.client_threads)
        if self.client_threads == 1:
            return plans, groups, None
        owner = np.zeros(len(sizes), np.int32)
        for k, members in enumerate(groups):
            owner[list(members)] = k
        return plans, groups, jax.device_put(owner)

    def _dispatch(
        self,
        d: Dispatch,
        c: int,
        c_next: int,
        state: FedState,
        carry: Any,
        finals: Any,
        run: tuple[RoundData, tuple],
    ) -> Any:
        """One jitted call for client ``c``; a kind's first call (the one that compiles) holds a
        lock, so two lanes never trace and compile the same program twice. ``run``: the round's
        data and its shapes (part of what a kind is: cohort buckets change them)."""
        kind = CallKind(d.steps, d.masked, d.opens, d.closes)
        data, shapes = run
        args = (
            state if d.opens or d.closes else None,
            carry,
            finals if d.closes else None,
            data,
            c,
            d.first,
            c_next if d.closes else None,
        )
        if (kind, shapes) in self._compiled:
            return self._call(kind, *args)
        with self._compile_lock:
            out = self._call(kind, *args)
            self._compiled.add((kind, shapes))
        return out

    def _run_lane(
        self, members: tuple[int, ...], plans: tuple, state: FedState, run: tuple, finals: Any
    ) -> Any:
        """The clients of one lane, one after another, writing into the lane's ``finals``: the
        lane opens its first client, and each client's closing call opens the next (the last
        one's opens the first again, unused), so no call kind opens and steps at once."""
        if not members:
            return finals
        carry = self._dispatch(OPEN, members[0], members[0], state, None, None, run)
        for i, c in enumerate(members):
            c_next = members[(i + 1) % len(members)]
            for d in plans[c]:
                out = self._dispatch(d, c, c_next, state, carry, finals, run)
                if d.closes:
                    finals, carry = out
                else:
                    carry = out
        return finals

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
        n_max = train.n_max
        ids_C = self._ids(len(sizes)) if ids is None else jax.device_put(np.asarray(ids, np.int32))
        steps = None if budget is None else tuple(int(b) for b in budget)
        plans, groups, owner = self._schedule(sizes, n_max, steps)
        if batches is None:
            batches = self._shuffle(key, train.n, n_max)
        idx_CSB, mask_CSB = batches
        buffers = self._begin(state, len(sizes), len(groups))
        data = RoundData(train.x, train.y, idx_CSB, mask_CSB, key, ids_C)
        shapes = jax.tree.map(jnp.shape, (train.x, train.y))
        run = (data, (str(shapes), idx_CSB.shape))
        if len(groups) == 1:
            buffers = (self._run_lane(groups[0], plans, state, run, buffers[0]),)
        else:
            pool = lane_pool(self.client_threads - 1)
            jobs = {
                k: pool.submit(self._run_lane, groups[k], plans, state, run, buffers[k])
                for k in range(1, len(groups))
                if groups[k]
            }
            first = self._run_lane(groups[0], plans, state, run, buffers[0])
            rest = (jobs[k].result() if k in jobs else buffers[k] for k in range(1, len(groups)))
            buffers = (first, *rest)
        weights = train.n if budget is None else budget_weights(train.n, jnp.asarray(budget))
        return self._finish(state, buffers, owner, weights, ids_C)
