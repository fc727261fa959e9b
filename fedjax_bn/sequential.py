"""The sequential executor: clients one after another, local steps as jitted calls.

This is the fast path on XLA:CPU, which has two traps measured in DESIGN.md: convolution
gradients inside a while loop (``lax.scan``) run ~13x slower, and vmapped per-client convs ~3x
slower. Here nothing loops on device: the host walks a schedule built once from the clients'
sizes and dispatches jitted calls that each run ``steps_per_call`` unrolled optimizer steps.

- Only real steps run: a client's no-op (fully padded) steps are skipped, not masked.
- Full batches run with no mask at all (a masked BatchNorm costs ~7-12% more on XLA:CPU), so a
  step costs what a plain jitted train step costs; only a client's last, partial batch per epoch
  is masked.
- A client's start is fused into its first call, and its last call writes its final state in
  place into a donated, stacked buffer: compile time and memory do not grow with the cohort.
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

from fedjax_bn import client as client_lib
from fedjax_bn.algorithms import Algorithm, ServerState, take_client
from fedjax_bn.cohort import RoundResult
from fedjax_bn.data import ClientArrays, round_batches, steps_per_epoch

Array = jax.Array
# One dispatch: (first step, number of steps, masked?).
Call = tuple[int, int, bool]


def schedule(n_c: int, n_max: int, batch_size: int, epochs: int, per_call: int) -> list[Call]:
    """A client's jitted calls: runs of up to ``per_call`` full steps, then the partial step."""
    spe = steps_per_epoch(n_max, batch_size)
    full, partial = divmod(n_c, batch_size)
    calls: list[Call] = []
    for e in range(epochs):
        for s in range(0, full, per_call):
            calls.append((e * spe + s, min(per_call, full - s), False))
        if partial:
            calls.append((e * spe + full, 1, True))
    return calls


class SequentialRound:
    """``(state, train, key, sizes) -> (state, RoundResult)``, clients one after another."""

    def __init__(
        self, alg: Algorithm, *, batch_size: int, local_epochs: int, steps_per_call: int = 1
    ) -> None:
        if steps_per_call < 1:
            raise ValueError(f"steps_per_call must be >= 1, got {steps_per_call}.")
        self.alg, self.batch_size, self.epochs = alg, batch_size, local_epochs
        self.steps_per_call = steps_per_call
        spec = alg.local

        def start(state: ServerState, c: Array) -> client_lib.ClientState:
            opt = None if state.client_opt is None else take_client(state.client_opt, c)
            variables = alg.client_variables(state, take_client(state.local, c))
            return client_lib.init_state(spec, variables, opt)

        def begin(
            state: ServerState, n_C: Array, key: Array, n_max: int
        ) -> tuple[Array, Array, client_lib.ClientState]:
            """The round's batches, and the stacked final client states every client starts
            from (a client with no data keeps its starting model)."""
            idx_CSB, mask_CSB = round_batches(key, n_C, n_max, batch_size, local_epochs)
            clients = jnp.arange(n_C.shape[0])
            finals = jax.vmap(lambda c: start(state, c))(clients)
            if state.client_opt is None:  # fresh optimizers are not sent back: don't keep them
                finals = finals._replace(opt_state=None)
            return idx_CSB, mask_CSB, finals

        def call(
            num: int,
            masked: bool,
            first: bool,
            last: bool,
            state_or_anchor: Any,
            cstate: client_lib.ClientState | None,
            finals: client_lib.ClientState | None,
            x_CN: Array,
            y_CN: Array,
            idx_CSB: Array,
            mask_CSB: Array,
            c: Array,
            s: Array,
        ) -> client_lib.ClientState:
            """``num`` steps of client ``c`` from step ``s``. The ``first`` call starts the
            client from the server state; the ``last`` writes it into the (donated) ``finals``."""
            if first:
                cstate, anchor = start(state_or_anchor, c), state_or_anchor.shared
            else:
                anchor = state_or_anchor  # None when there is no proximal term
            for i in range(num):
                idx_B = idx_CSB[c, s + i]
                mask_B = mask_CSB[c, s + i] if masked else None
                x_B, y_B = x_CN[c, idx_B], y_CN[c, idx_B]  # one gather of B rows
                cstate = client_lib.train_step(spec, anchor, cstate, x_B, y_B, mask_B)
            if not last:
                return cstate
            if finals.opt_state is None:
                cstate = cstate._replace(opt_state=None)
            return jax.tree.map(lambda f, v: f.at[c].set(v), finals, cstate)

        def finish(
            state: ServerState, finals: client_lib.ClientState, n_C: Array
        ) -> tuple[ServerState, RoundResult]:
            res = client_lib.finish(finals)
            new_state = alg.server_update(state, res, n_C)
            return new_state, RoundResult(res.loss, res.accuracy, res.num_seen)

        # Built once: rounds never re-trace. ``finals`` is donated, so writing a client's
        # final state into it is in place, and compile cost does not grow with the cohort.
        self._begin = jax.jit(begin, static_argnums=3)
        self._call = jax.jit(call, static_argnums=(0, 1, 2, 3), donate_argnums=6)
        # Not donated: the stacked client states share no shape with the server state, so XLA
        # could reuse none of them (jax warns "Some donated buffers were not usable").
        self._finish = jax.jit(finish)
        self._schedule = functools.lru_cache(maxsize=64)(self._build_schedule)

    def _build_schedule(self, sizes: tuple[int, ...], n_max: int) -> tuple[list[Call], ...]:
        return tuple(
            schedule(n, n_max, self.batch_size, self.epochs, self.steps_per_call) for n in sizes
        )

    def __call__(
        self, state: ServerState, train: ClientArrays, key: Array, sizes: tuple[int, ...]
    ) -> tuple[ServerState, RoundResult]:
        n_max = train.y.shape[1]
        idx_CSB, mask_CSB, finals = self._begin(state, train.n, key, n_max)
        data = (train.x, train.y, idx_CSB, mask_CSB)
        anchor = state.shared if self.alg.local.mu else None  # fewer arguments to dispatch
        for c, calls in enumerate(self._schedule(sizes, n_max)):
            cstate, last = None, len(calls) - 1
            for i, (s, num, masked) in enumerate(calls):
                first = i == 0
                out = self._call(
                    num,
                    masked,
                    first,
                    i == last,
                    state if first else anchor,
                    cstate,
                    finals if i == last else None,
                    *data,
                    c,
                    s,
                )
                if i == last:
                    finals = out
                else:
                    cstate = out
        return self._finish(state, finals, train.n)
