"""The one local loop: a client's steps over its round batches, under any executor.

Every executor runs clients through :func:`local_steps` with the algorithm's ``client_step``:
the lockstep executors over a whole round (vmapped, chunked or sharded), ``sequential`` over
the few steps of one jitted call. Steps that are full for every client run with no mask at all
(a masked BatchNorm costs more on XLA:CPU); the rest are masked, and a fully masked step
is a no-op. ``scan`` suits GPU/TPU; ``unroll`` avoids the XLA:CPU trap where convolution
gradients inside a while loop run several times slower (``docs/design.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp

from fedjax_bn import client as client_lib
from fedjax_bn.client import Batch, ClientResult, LocalTraining
from fedjax_bn.execution.batches import gather_batch
from fedjax_bn.execution.streams import STEP_STREAM
from fedjax_bn.tree import Variables

Array = jax.Array
LocalLoop = Literal["scan", "unroll"]
LOOPS: tuple[str, ...] = ("scan", "unroll")
Step = Callable[[Any, Batch], Any]


def client_key(key: Array, client_id: Array) -> Array:
    """A client's base key for its local steps: the round key's ``STEP_STREAM`` folded with
    the client's population id, so a client's keys do not depend on its slot or cohort."""
    return jax.random.fold_in(jax.random.fold_in(key, STEP_STREAM), client_id)


def client_keys(key: Array, ids_C: Array) -> Array:
    """:func:`client_key` of every client ``[C]``."""
    return jax.vmap(lambda i: client_key(key, i))(jnp.asarray(ids_C, jnp.int32))


def step_key(client_key: Array | None, s: Any) -> Array | None:
    """Step ``s``'s key (``s``: the step's index in the round layout, so every executor gives
    a step the same key whether it skips no-op steps or not)."""
    return None if client_key is None else jax.random.fold_in(client_key, s)


def check_loop(loop: str) -> None:
    """Raise a ValueError naming the valid local loops."""
    if loop not in LOOPS:
        raise ValueError(f"Unknown local loop {loop!r}; use 'scan' or 'unroll'.")


def local_steps(
    step: Step,
    carry: Any,
    x_N: Array,
    y_N: Array,
    idx_SB: Array,
    mask_SB: Array,
    *,
    full: int,
    epochs: int = 1,
    loop: LocalLoop = "unroll",
    key: Array | None = None,
    first: Any = 0,
) -> Any:
    """Run ``idx_SB.shape[0]`` steps: per epoch ``full`` unmasked steps, then masked ones.

    ``key``: the client's base key (:func:`client_keys`); step ``i`` gets
    ``step_key(key, first + i)``, ``first`` being the layout index of ``idx_SB[0]``."""
    check_loop(loop)

    def one(carry: Any, idx_B: Array, mask_B: Array | None, s: Any) -> Any:
        x_B, y_B = gather_batch(x_N, y_N, idx_B)
        return step(carry, Batch(x_B, y_B, mask_B, step_key(key, first + s)))

    num_steps, batch = idx_SB.shape
    per_epoch = num_steps // epochs
    if loop == "unroll":
        for s in range(num_steps):
            carry = one(carry, idx_SB[s], None if s % per_epoch < full else mask_SB[s], s)
        return carry

    def epoch(carry: Any, batches: tuple[Array, Array, Array]) -> tuple[Any, None]:
        idx_LB, mask_LB, s_L = batches
        if full:
            full_steps = (idx_LB[:full], s_L[:full])
            carry = jax.lax.scan(lambda c, b: (one(c, b[0], None, b[1]), None), carry, full_steps)[
                0
            ]
        if per_epoch > full:
            rest = (idx_LB[full:], mask_LB[full:], s_L[full:])
            carry = jax.lax.scan(lambda c, b: (one(c, *b), None), carry, rest)[0]
        return carry, None

    shape = (epochs, per_epoch, batch)
    s_EL = jnp.arange(num_steps, dtype=jnp.int32).reshape(epochs, per_epoch)
    batches = (idx_SB.reshape(shape), mask_SB.reshape(shape), s_EL)
    if epochs == 1:
        return epoch(carry, jax.tree.map(lambda a: a[0], batches))[0]
    return jax.lax.scan(epoch, carry, batches)[0]


def client_update(
    spec: LocalTraining,
    variables: Variables,
    anchor: Variables | None,
    x_N: Array,
    y_N: Array,
    idx_SB: Array,
    mask_SB: Array,
    opt_state: Any = None,
    *,
    loop: LocalLoop = "scan",
    key: Array | None = None,
) -> ClientResult:
    """A client's whole local round with plain local training: start from ``variables``, train
    on every (masked) step, report. The reference the algorithms' client sides are tested
    against."""

    def step(state: client_lib.LocalState, batch: Batch) -> client_lib.LocalState:
        return client_lib.train_step(spec, anchor, state, batch)

    state = client_lib.init_state(spec, variables, opt_state)
    state = local_steps(step, state, x_N, y_N, idx_SB, mask_SB, full=0, loop=loop, key=key)
    m = client_lib.metrics(state)
    return ClientResult(state.variables, state.opt_state, m.loss, m.accuracy, m.num_seen)
