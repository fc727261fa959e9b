"""Lockstep executors: a cohort's clients vmapped in one jitted call, or in chunks of ``k``.

The whole round (on-device shuffling and batching with ``jax.random``, every client's local
steps, aggregation) is one jitted function of a static :class:`~fedjax_bn.cohort.Plan`. Clients
that ran out of data take masked no-op steps; steps that are full for every client of a group
run with no mask at all. ``sharding.py`` runs the same group function under ``shard_map``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn import client as client_lib
from fedjax_bn.algorithms import Algorithm, ServerState
from fedjax_bn.cohort import Group, Plan, RoundResult, client_order
from fedjax_bn.data import ClientArrays, gather_batch, round_batches

Array = jax.Array
# (local, client_opt, x_CN, y_CN, idx_CSB, mask_CSB): one group's per-client inputs.
Inputs = tuple[Any, Any, Array, Array, Array, Array]
GroupRunner = Callable[[Group, ServerState, Inputs], client_lib.ClientResult]


def local_steps(
    spec: client_lib.LocalTraining,
    anchor: Any,
    state: client_lib.ClientState,
    x_N: Array,
    y_N: Array,
    idx_SB: Array,
    mask_SB: Array,
    *,
    full: int,
    epochs: int,
    loop: client_lib.LocalLoop,
) -> client_lib.ClientState:
    """A client's steps: per epoch ``full`` unmasked steps, then masked ones.

    ``scan`` (GPU/TPU) scans each kind of step; ``unroll`` traces every step (XLA:CPU, where
    convolution gradients inside a while loop run ~13x slower).
    """

    def step(state: client_lib.ClientState, idx_B: Array, mask_B: Array | None):
        x_B, y_B = gather_batch(x_N, y_N, idx_B)
        return client_lib.train_step(spec, anchor, state, x_B, y_B, mask_B)

    num_steps, batch = idx_SB.shape
    per_epoch = num_steps // epochs
    if loop == "unroll":
        for s in range(num_steps):
            state = step(state, idx_SB[s], None if s % per_epoch < full else mask_SB[s])
        return state
    if loop != "scan":
        raise ValueError(f"Unknown local loop {loop!r}; use 'scan' or 'unroll'.")

    def epoch(state: client_lib.ClientState, batches: tuple[Array, Array]):
        idx_LB, mask_LB = batches
        if full:
            state = jax.lax.scan(lambda s, i: (step(s, i, None), None), state, idx_LB[:full])[0]
        if per_epoch > full:
            rest = (idx_LB[full:], mask_LB[full:])
            state = jax.lax.scan(lambda s, b: (step(s, *b), None), state, rest)[0]
        return state, None

    shape = (epochs, per_epoch, batch)
    batches = (idx_SB.reshape(shape), mask_SB.reshape(shape))
    if epochs == 1:
        return epoch(state, jax.tree.map(lambda a: a[0], batches))[0]
    return jax.lax.scan(epoch, state, batches)[0]


def run_clients(
    alg: Algorithm,
    loop: client_lib.LocalLoop,
    chunk_size: int | None,
    group: Group,
    state: ServerState,
    inputs: Inputs,
) -> client_lib.ClientResult:
    """One group's clients: vmapped all at once, or ``chunk_size`` at a time (``lax.map``)."""
    anchor = state.shared

    def one(args: Inputs) -> client_lib.ClientResult:
        local, opt, x_N, y_N, idx_SB, mask_SB = args
        cstate = client_lib.init_state(alg.local, alg.client_variables(state, local), opt)
        cstate = local_steps(
            alg.local,
            anchor,
            cstate,
            x_N,
            y_N,
            idx_SB,
            mask_SB,
            full=group.full,
            epochs=group.epochs,
            loop=loop,
        )
        return client_lib.finish(cstate)

    if chunk_size is None:
        return jax.vmap(one)(inputs)
    return jax.lax.map(one, inputs, batch_size=chunk_size)


def group_inputs(
    group: Group, state: ServerState, train: ClientArrays, idx_CSB: Array, mask_CSB: Array
) -> Inputs:
    """The group's slice of the per-client inputs (no copy for a whole, in-order cohort)."""
    steps = np.asarray(group.steps)
    if len(steps) != idx_CSB.shape[1] or np.any(steps != np.arange(len(steps))):
        idx_CSB, mask_CSB = idx_CSB[:, steps], mask_CSB[:, steps]
    if group.clients is None:
        return state.local, state.client_opt, train.x, train.y, idx_CSB, mask_CSB
    sel = np.asarray(group.clients)

    def take(tree: Any) -> Any:
        return jax.tree.map(lambda a: a[sel], tree)

    x, y = train.x[sel, : group.n_hi], train.y[sel, : group.n_hi]
    return take(state.local), take(state.client_opt), x, y, idx_CSB[sel], mask_CSB[sel]


def lockstep_round(
    alg: Algorithm,
    plan: Plan,
    run_group: GroupRunner,
    state: ServerState,
    train: ClientArrays,
    key: Array,
) -> tuple[ServerState, RoundResult]:
    """A whole round, pure and jittable with ``plan`` and ``run_group`` static."""
    idx_CSB, mask_CSB = round_batches(key, train.n, plan.n_max, plan.batch_size, plan.epochs)
    # Clients see only the global leaves; their own (stacked) leaves go in through ``inputs``.
    global_state = state._replace(local={}, client_opt=None)
    parts = []
    for group in plan.groups:
        inputs = group_inputs(group, state, train, idx_CSB, mask_CSB)
        out = run_group(group, global_state, inputs)
        if group.clients is not None and group.num_real < len(group.clients):
            out = jax.tree.map(lambda a, k=group.num_real: a[:k], out)
        parts.append(out)
    results = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts) if len(parts) > 1 else parts[0]
    order = client_order(plan)
    if order is not None:
        results = jax.tree.map(lambda a: a[order], results)
    new_state = alg.server_update(state, results, train.n)
    return new_state, RoundResult(results.loss, results.accuracy, results.num_seen)


def default_local_loop() -> client_lib.LocalLoop:
    """``unroll`` on CPU (conv gradients in a while loop are ~13x slower there), else ``scan``."""
    return "unroll" if jax.default_backend() == "cpu" else "scan"
