"""How a round's clients run: one pure client update, several executors.

- ``vmap``: every client in one jitted, vmapped call (fills a GPU/TPU with many small clients);
- ``sequential``: clients one after another, each local step a jitted call. On XLA:CPU this
  avoids both traps measured in DESIGN.md (``lax.scan`` over conv gradients, vmapped convs).

Both return the same :class:`RoundResult` and the same new state (up to float reassociation).
A round never re-traces after its first call: every jitted function is built once here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn import client as client_lib
from fedjax_bn.algorithms import Algorithm, ServerState, take_client
from fedjax_bn.data import ClientArrays, round_batches, valid_steps

Array = jax.Array
ExecutorName = Literal["vmap", "sequential"]
EXECUTORS: tuple[str, ...] = ("vmap", "sequential")


class RoundResult(NamedTuple):
    """Per-client training metrics of one round (each [C])."""

    loss: Array
    accuracy: Array
    num_seen: Array


RoundFn = Callable[[ServerState, ClientArrays, Array], tuple[ServerState, RoundResult]]


def default_local_loop() -> client_lib.LocalLoop:
    """``unroll`` on CPU (conv gradients in a while loop are ~13x slower there), else ``scan``."""
    return "unroll" if jax.default_backend() == "cpu" else "scan"


def _vmap_round(
    alg: Algorithm,
    batch_size: int,
    epochs: int,
    loop: client_lib.LocalLoop,
    state: ServerState,
    train: ClientArrays,
    key: Array,
) -> tuple[ServerState, RoundResult]:
    idx_CSB, mask_CSB = round_batches(key, train.n, train.y.shape[1], batch_size, epochs)
    anchor = state.shared

    def one_client(local, x_N, y_N, idx_SB, mask_SB, opt_state):
        variables = alg.client_variables(state, local)
        return client_lib.client_update(
            alg.local, variables, anchor, x_N, y_N, idx_SB, mask_SB, opt_state, loop=loop
        )

    opt_axis = None if state.client_opt is None else 0
    results = jax.vmap(one_client, in_axes=(0, 0, 0, 0, 0, opt_axis))(
        state.local, train.x, train.y, idx_CSB, mask_CSB, state.client_opt
    )
    new_state = alg.server_update(state, results, train.n)
    return new_state, RoundResult(results.loss, results.accuracy, results.num_seen)


def vmap_round(
    alg: Algorithm, *, batch_size: int, local_epochs: int, loop: client_lib.LocalLoop | None = None
) -> RoundFn:
    """The whole round (batching, all clients, aggregation) as one jitted, vmapped call."""
    fn = functools.partial(_vmap_round, alg, batch_size, local_epochs, loop or default_local_loop())
    return jax.jit(fn)


def sequential_round(alg: Algorithm, *, batch_size: int, local_epochs: int) -> RoundFn:
    """Clients one after another; every local step is one jitted call, no-op steps are skipped."""
    spec = alg.local

    @jax.jit
    def start(state: ServerState, c: Array) -> client_lib.ClientState:
        opt = None if state.client_opt is None else take_client(state.client_opt, c)
        variables = alg.client_variables(state, take_client(state.local, c))
        return client_lib.init_state(spec, variables, opt)

    @jax.jit
    def step(anchor, cstate, x_CN, y_CN, idx_CSB, mask_CSB, c, s) -> client_lib.ClientState:
        idx_B = idx_CSB[c, s]
        return client_lib.train_step(
            spec, anchor, cstate, x_CN[c, idx_B], y_CN[c, idx_B], mask_CSB[c, s]
        )

    batches = jax.jit(round_batches, static_argnums=(2, 3, 4))
    finish_all = jax.jit(
        lambda state, states, n: (
            alg.server_update(state, client_lib.finish(states), n),
            client_lib.finish(states),
        )
    )

    def run(state: ServerState, train: ClientArrays, key: Array) -> tuple[ServerState, RoundResult]:
        n_max = train.y.shape[1]
        idx_CSB, mask_CSB = batches(key, train.n, n_max, batch_size, local_epochs)
        sizes = np.asarray(train.n)
        finals = []
        for c in range(len(sizes)):
            cstate = start(state, c)
            for s in valid_steps(int(sizes[c]), n_max, batch_size, local_epochs):
                cstate = step(state.shared, cstate, train.x, train.y, idx_CSB, mask_CSB, c, s)
            finals.append(cstate)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *finals)
        new_state, results = finish_all(state, stacked, train.n)
        return new_state, RoundResult(results.loss, results.accuracy, results.num_seen)

    return run


def make_round(
    alg: Algorithm,
    *,
    executor: ExecutorName = "sequential",
    batch_size: int = 32,
    local_epochs: int = 1,
) -> RoundFn:
    """A round function ``(state, train_arrays, key) -> (state, RoundResult)``."""
    if batch_size < 1 or local_epochs < 1:
        raise ValueError(
            f"batch_size and local_epochs must be >= 1, got {batch_size} and {local_epochs}."
        )
    if executor == "vmap":
        return vmap_round(alg, batch_size=batch_size, local_epochs=local_epochs)
    if executor == "sequential":
        return sequential_round(alg, batch_size=batch_size, local_epochs=local_epochs)
    raise ValueError(f"Unknown executor {executor!r}; valid executors: {', '.join(EXECUTORS)}.")
