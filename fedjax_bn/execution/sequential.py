"""The sequential executor: clients one after another, local steps as jitted calls.

This is the fast path on XLA:CPU, which has two traps measured in ``docs/design.md``:
convolution gradients inside a while loop (``lax.scan``) run 4-13x slower, and vmapped
per-client convs 2-5x slower. Here nothing loops on device: the host walks a schedule built
once from the clients' sizes (``plan.schedule``) and dispatches jitted calls that each run
``steps_per_call`` unrolled steps of the one local loop (``loop.local_steps``).

- Only real steps run: a client's no-op (fully padded) steps are skipped, not masked, and
  so are the steps past its budget (``fedjax_bn.budgets``: its schedule is cut short).
- Full batches run with no mask at all, so a step costs what a plain jitted train step costs;
  only a client's last, partial batch per epoch is masked.
- A client's ``client_init`` is fused into its first call, and its last call runs
  ``client_final`` and writes the outputs in place into a donated, stacked buffer: compile
  time and memory do not grow with the cohort.
- Data and batch indices stay on device; the only host data is the clients' sizes (cached).
- Every jitted function is built once, in the constructor, so rounds never re-trace.
- One step per call by default: on XLA:CPU a jit of 5 unrolled steps measured ~17% slower
  than 5 single-step calls (``steps_per_call`` exists to re-measure elsewhere).
- ``client_threads`` host threads run the clients, split into lanes of similar step counts
  (``plan.lanes``): on the 2-core CPU two independent train steps in flight at once ran
  1.2-1.8x the throughput of one (``docs/startup.md``). Each lane writes its clients' outputs
  into a stacked buffer of its own, and ``finish`` takes each client's row from its lane's
  buffer, so the result is bitwise that of one thread. Worker threads see jax's global config,
  not a thread-local context (``with jax.default_device(...)`` and the like).
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn.algorithms.base import Algorithm, FedState
from fedjax_bn.budgets import budget_weights
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution.batches import round_batches
from fedjax_bn.execution.lockstep import Outputs, RoundResult
from fedjax_bn.execution.loop import local_steps
from fedjax_bn.execution.plan import Dispatch, dispatches, lanes, schedule
from fedjax_bn.execution.quarantine import aggregate_round
from fedjax_bn.tree import put_client, take_client

Array = jax.Array


def default_client_threads(backend: str | None = None) -> int:
    """Host threads for ``sequential``: 2 on a CPU with at least 2 cores (measured faster
    there), else 1 (one device stream; not measured to help on GPU/TPU)."""
    if (backend or jax.default_backend()) != "cpu":
        return 1
    return min(2, os.cpu_count() or 1)


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


class SequentialRound:
    """``(state, train, key, sizes) -> (state, RoundResult)``, clients one after another."""

    def __init__(
        self,
        alg: Algorithm,
        *,
        batch_size: int,
        local_epochs: int,
        steps_per_call: int = 1,
        client_threads: int | None = None,
    ) -> None:
        threads = default_client_threads() if client_threads is None else client_threads
        if steps_per_call < 1 or threads < 1:
            raise ValueError(
                f"steps_per_call and client_threads must be >= 1, got {steps_per_call} and "
                f"{threads}."
            )
        self.alg, self.batch_size, self.epochs = alg, batch_size, local_epochs
        self.steps_per_call, self.client_threads = steps_per_call, threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._compiled: set[tuple] = set()  # call kinds (and data shapes) compiled
        self._compile_lock = threading.Lock()

        def begin(
            state: FedState, n_C: Array, key: Array, n_max: int, num_lanes: int, batches: Any
        ) -> tuple[Array, Array, tuple[Any, ...]]:
            """The round's batches (shuffled by ``key``, or the given ``batches``), and each
            lane's stacked output buffer: the first holds the outputs every client starts from
            (a client with no data reports its starting model and keeps its state), the others
            zeros (only the rows of their lane's clients are read)."""
            if batches is None:
                batches = round_batches(key, n_C, n_max, batch_size, local_epochs)
            idx_CSB, mask_CSB = batches
            start = jax.vmap(
                lambda cl: alg.client_final(alg.client_init(state.server, cl)),
                axis_size=n_C.shape[0],  # clients may be an empty tree (fedavg)
            )
            finals = start(state.clients)
            spare = tuple(jax.tree.map(jnp.zeros_like, finals) for _ in range(num_lanes - 1))
            return idx_CSB, mask_CSB, (finals, *spare)

        def call(
            num: int,
            masked: bool,
            first: bool,
            last: bool,
            state: FedState | None,
            carry: Any,
            finals: Outputs | None,
            x_CN: Array,
            y_CN: Array,
            idx_CSB: Array,
            mask_CSB: Array,
            c: Array,
            s: Array,
        ) -> Any:
            """``num`` steps of client ``c`` from step ``s``. The ``first`` call starts the
            client from the state; the ``last`` writes its outputs into the donated ``finals``."""
            if first:
                carry = alg.client_init(state.server, take_client(state.clients, c))
            idx_SB = jax.lax.dynamic_slice_in_dim(idx_CSB[c], s, num)
            mask_SB = jax.lax.dynamic_slice_in_dim(mask_CSB[c], s, num)
            carry = local_steps(
                alg.client_step, carry, x_CN[c], y_CN[c], idx_SB, mask_SB, full=0 if masked else num
            )
            if not last:
                return carry
            return put_client(finals, c, alg.client_final(carry))

        def finish(
            state: FedState, buffers: tuple[Outputs, ...], owner_C: Array | None, n_C: Array
        ) -> tuple[FedState, RoundResult]:
            finals = select_rows(owner_C, buffers)
            server, clients, bad = aggregate_round(alg, state.server, state.clients, finals, n_C)
            return FedState(server, clients, state.round + 1), RoundResult(*finals[2], bad)

        # Built once: rounds never re-trace. ``finals`` is donated, so writing a client's
        # outputs into it is in place, and compile cost does not grow with the cohort.
        self._begin = jax.jit(begin, static_argnums=(3, 4))
        self._call = jax.jit(call, static_argnums=(0, 1, 2, 3), donate_argnums=6)
        # Not donated: the stacked outputs share no shape with the new state's leaves, so XLA
        # could reuse few of them (jax warns "Some donated buffers were not usable").
        self._finish = jax.jit(finish)
        self._schedule = functools.lru_cache(maxsize=64)(self._build_schedule)

    def _build_schedule(
        self, sizes: tuple[int, ...], n_max: int, budget: tuple[int, ...] | None
    ) -> tuple[tuple[list[Dispatch], ...], tuple[tuple[int, ...], ...], np.ndarray | None]:
        """Each client's dispatches, the lanes of clients, and which lane holds client c's
        outputs (None with one lane)."""
        per_client = budget or (None,) * len(sizes)
        plans = tuple(
            dispatches(schedule(n, n_max, self.batch_size, self.epochs, self.steps_per_call, b))
            for n, b in zip(sizes, per_client, strict=True)
        )
        steps = [sum(d[1] for d in p) for p in plans]
        groups = lanes(steps, self.client_threads)
        if len(groups) == 1:
            return plans, groups, None
        owner = np.zeros(len(sizes), np.int32)
        for k, members in enumerate(groups):
            owner[list(members)] = k
        return plans, groups, owner

    def _dispatch(self, d: Dispatch, state: FedState, carry: Any, finals: Any, data: tuple) -> Any:
        """One jitted call; a kind's first call (the one that compiles) holds a lock, so two
        lanes never trace and compile the same program twice."""
        s, num, masked, first, last = d
        args = (state if first else None, carry, finals if last else None, *data, s)
        kind = (num, masked, first, last, *(jnp.shape(a) for a in data[:4]))
        if kind in self._compiled:
            return self._call(num, masked, first, last, *args)
        with self._compile_lock:
            out = self._call(num, masked, first, last, *args)
            self._compiled.add(kind)
        return out

    def _run_lane(
        self, members: tuple[int, ...], plans: tuple, state: FedState, data: tuple, finals: Any
    ) -> Any:
        """The clients of one lane, one after another, writing into the lane's ``finals``."""
        for c in members:
            carry = None
            for d in plans[c]:
                out = self._dispatch(d, state, carry, finals, (*data, c))
                if d[4]:
                    finals = out
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
    ) -> tuple[FedState, RoundResult]:
        n_max = train.y.shape[1]
        steps = None if budget is None else tuple(int(b) for b in budget)
        plans, groups, owner = self._schedule(sizes, n_max, steps)
        idx_CSB, mask_CSB, buffers = self._begin(state, train.n, key, n_max, len(groups), batches)
        data = (train.x, train.y, idx_CSB, mask_CSB)
        if len(groups) == 1:
            buffers = (self._run_lane(groups[0], plans, state, data, buffers[0]),)
        else:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self.client_threads - 1, thread_name_prefix="fedjax_bn-client"
                )
            futures = [
                self._pool.submit(self._run_lane, g, plans, state, data, b)
                for g, b in zip(groups[1:], buffers[1:], strict=True)
            ]
            first = self._run_lane(groups[0], plans, state, data, buffers[0])
            buffers = (first, *(f.result() for f in futures))
        weights = train.n if budget is None else budget_weights(train.n, jnp.asarray(budget))
        return self._finish(
            state, buffers, None if owner is None else jax.device_put(owner), weights
        )
