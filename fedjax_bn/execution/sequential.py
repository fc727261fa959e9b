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
"""

from __future__ import annotations

import functools
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
from fedjax_bn.execution.plan import Call, schedule
from fedjax_bn.execution.quarantine import aggregate_round
from fedjax_bn.tree import put_client, take_client

Array = jax.Array


class SequentialRound:
    """``(state, train, key, sizes) -> (state, RoundResult)``, clients one after another."""

    def __init__(
        self, alg: Algorithm, *, batch_size: int, local_epochs: int, steps_per_call: int = 1
    ) -> None:
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}.")
        self.alg, self.batch_size, self.epochs = alg, batch_size, local_epochs
        self.steps_per_call = steps_per_call

        def begin(
            state: FedState, n_C: Array, key: Array, n_max: int, batches: Any = None
        ) -> tuple[Array, Array, Any]:
            """The round's batches (shuffled by ``key``, or the given ``batches``), and the
            stacked outputs every client starts from (a client with no data reports its
            starting model and keeps its state)."""
            if batches is None:
                batches = round_batches(key, n_C, n_max, batch_size, local_epochs)
            idx_CSB, mask_CSB = batches
            start = jax.vmap(
                lambda cl: alg.client_final(alg.client_init(state.server, cl)),
                axis_size=n_C.shape[0],  # clients may be an empty tree (fedavg)
            )
            finals = start(state.clients)
            return idx_CSB, mask_CSB, finals

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

        def finish(state: FedState, finals: Outputs, n_C: Array) -> tuple[FedState, RoundResult]:
            server, clients, bad = aggregate_round(alg, state.server, state.clients, finals, n_C)
            return FedState(server, clients, state.round + 1), RoundResult(*finals[2], bad)

        # Built once: rounds never re-trace. ``finals`` is donated, so writing a client's
        # outputs into it is in place, and compile cost does not grow with the cohort.
        self._begin = jax.jit(begin, static_argnums=3)
        self._call = jax.jit(call, static_argnums=(0, 1, 2, 3), donate_argnums=6)
        # Not donated: the stacked outputs share no shape with the new state's leaves, so XLA
        # could reuse few of them (jax warns "Some donated buffers were not usable").
        self._finish = jax.jit(finish)
        self._schedule = functools.lru_cache(maxsize=64)(self._build_schedule)

    def _build_schedule(
        self, sizes: tuple[int, ...], n_max: int, budget: tuple[int, ...] | None
    ) -> tuple[list[Call], ...]:
        per_client = budget or (None,) * len(sizes)
        return tuple(
            schedule(n, n_max, self.batch_size, self.epochs, self.steps_per_call, b)
            for n, b in zip(sizes, per_client, strict=True)
        )

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
        idx_CSB, mask_CSB, finals = self._begin(state, train.n, key, n_max, batches)
        data = (train.x, train.y, idx_CSB, mask_CSB)
        steps = None if budget is None else tuple(int(b) for b in budget)
        for c, calls in enumerate(self._schedule(sizes, n_max, steps)):
            carry, last = None, len(calls) - 1
            for i, (s, num, masked) in enumerate(calls):
                first = i == 0
                out = self._call(
                    num,
                    masked,
                    first,
                    i == last,
                    state if first else None,
                    carry,
                    finals if i == last else None,
                    *data,
                    c,
                    s,
                )
                if i == last:
                    finals = out
                else:
                    carry = out
        weights = train.n if budget is None else budget_weights(train.n, jnp.asarray(budget))
        return self._finish(state, finals, weights)
