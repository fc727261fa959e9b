"""Lockstep executors: a cohort's clients vmapped in one jitted call, or in chunks of ``k``.

The whole round (on-device shuffling and batching with ``jax.random``, every client's local
steps, aggregation) is one jitted function of a static :class:`~fedjax_bn.execution.plan.Plan`.
Clients that ran out of data take masked no-op steps; steps that are full for every client of
a group run with no mask at all (none with a budget: ``fedjax_bn.budgets``, whose steps past a
client's budget are masked, as data). ``sharded.py`` runs the same group function under
``shard_map``. Client states are gathered and scattered as whole trees: nothing here knows an
algorithm's fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn.algorithms.base import Algorithm, FedState
from fedjax_bn.budgets import budget_weights
from fedjax_bn.client import accuracy_of
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution.batches import budget_mask, round_batches
from fedjax_bn.execution.loop import LocalLoop, client_keys, local_steps
from fedjax_bn.execution.plan import Group, Plan, client_order
from fedjax_bn.execution.quarantine import aggregate_round
from fedjax_bn.tree import concat_clients, take_client

Array = jax.Array


class RoundResult(NamedTuple):
    """Per-client training metrics of one round (each ``[C]``): mean loss, each task metric's
    mean (``metrics[name]``), examples seen; ``quarantined`` marks clients whose update or loss
    was not finite (dropped from the aggregation, state not written)."""

    loss: Array
    metrics: dict[str, Array]
    num_seen: Array
    quarantined: Array

    @property
    def accuracy(self) -> Array:
        """The ``accuracy`` metric (NaN where the task has none)."""
        return accuracy_of(self)


class Inputs(NamedTuple):
    """One group's per-client inputs, every leaf with a leading client axis."""

    clients: Any
    x: Any
    y: Any
    idx: Array
    mask: Array
    key: Array  # each client's base key for its step keys (``loop.client_keys``)


# (message, client state, metrics) of a group's clients, stacked.
Outputs = tuple[Any, Any, Any]
GroupRunner = Callable[[Group, Any, Inputs], Outputs]


def run_client(alg: Algorithm, server: Any, client: Any, data: Inputs, group: Group, loop: str):
    """One client's round: ``client_init``, the local loop, ``client_final``."""
    carry = alg.client_init(server, client)
    carry = local_steps(
        alg.client_step,
        carry,
        data.x,
        data.y,
        data.idx,
        data.mask,
        full=group.full,
        epochs=group.epochs,
        loop=loop,
        key=data.key,
    )
    return alg.client_final(carry)


def run_clients(
    alg: Algorithm,
    loop: LocalLoop,
    chunk_size: int | None,
    group: Group,
    server: Any,
    inputs: Inputs,
) -> Outputs:
    """One group's clients: vmapped all at once, or ``chunk_size`` at a time (``lax.map``)."""

    def one(args: Inputs) -> Outputs:
        return run_client(alg, server, args.clients, args, group, loop)

    if chunk_size is None:
        return jax.vmap(one)(inputs)
    return jax.lax.map(one, inputs, batch_size=chunk_size)


def group_inputs(
    group: Group,
    clients: Any,
    train: ClientArrays,
    idx_CSB: Array,
    mask_CSB: Array,
    keys_C: Array,
) -> Inputs:
    """The group's slice of the per-client inputs (no copy for a whole, in-order cohort)."""
    steps = np.asarray(group.steps)
    if len(steps) != idx_CSB.shape[1] or np.any(steps != np.arange(len(steps))):
        idx_CSB, mask_CSB = idx_CSB[:, steps], mask_CSB[:, steps]
    if group.clients is None:
        return Inputs(clients, train.x, train.y, idx_CSB, mask_CSB, keys_C)
    sel = np.asarray(group.clients)
    x, y = jax.tree.map(lambda a: a[sel, : group.n_hi], (train.x, train.y))
    return Inputs(take_client(clients, sel), x, y, idx_CSB[sel], mask_CSB[sel], keys_C[sel])


def lockstep_round(
    alg: Algorithm,
    plan: Plan,
    run_group: GroupRunner,
    state: FedState,
    train: ClientArrays,
    key: Array,
    batches: Any = None,
    budget_C: Array | None = None,
    ids_C: Array | None = None,
) -> tuple[FedState, RoundResult]:
    """A whole round, pure and jittable with ``plan`` and ``run_group`` static; ``batches``
    (``(idx, mask)`` in ``round_batches``' layout) replaces the shuffle by ``key``;
    ``budget_C`` (``fedjax_bn.budgets``) masks each client's steps past its budget; ``ids_C``:
    the clients' population ids for their step keys (default ``arange(C)``)."""
    if ids_C is None:
        ids_C = jnp.arange(train.n.shape[0], dtype=jnp.int32)
    keys_C = client_keys(key, ids_C)
    if batches is None:
        batches = round_batches(key, train.n, plan.n_max, plan.batch_size, plan.epochs)
    idx_CSB, mask_CSB = batches
    weights_C = train.n
    if budget_C is not None:
        mask_CSB = budget_mask(mask_CSB, budget_C)
        weights_C = budget_weights(train.n, budget_C)
    parts = []
    for group in plan.groups:
        if budget_C is not None:  # a budget may cut any step: none may run unmasked
            group = dataclasses.replace(group, full=0)
        inputs = group_inputs(group, state.clients, train, idx_CSB, mask_CSB, keys_C)
        out = run_group(group, state.server, inputs)
        if group.clients is not None and group.num_real < len(group.clients):
            out = jax.tree.map(lambda a, k=group.num_real: a[:k], out)
        parts.append(out)
    results = concat_clients(parts)
    order = client_order(plan)
    if order is not None:
        results = take_client(results, order)
    server, clients, bad = aggregate_round(alg, state.server, state.clients, results, weights_C)
    return FedState(server, clients, state.round + 1), RoundResult(*results[2], bad)


def default_local_loop() -> LocalLoop:
    """``unroll`` on CPU (conv gradients in a while loop are several times slower there), else
    ``scan``."""
    return "unroll" if jax.default_backend() == "cpu" else "scan"
