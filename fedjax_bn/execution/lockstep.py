"""Lockstep executors: a cohort's clients vmapped in one jitted call (``VmapExecutor``), or
in chunks of ``k`` (``ChunkedExecutor``); ``sharded.py`` builds on the same round.

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
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn.algorithms.base import Algorithm, FedState
from fedjax_bn.budgets import budget_weights
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution.batches import budget_mask, round_batches
from fedjax_bn.execution.executor import RoundResult
from fedjax_bn.execution.loop import LocalLoop, client_keys, local_steps
from fedjax_bn.execution.plan import Group, Plan, client_order, make_plan
from fedjax_bn.execution.quarantine import aggregate_round
from fedjax_bn.tree import concat_clients, take_client

if TYPE_CHECKING:
    from jax.sharding import Mesh

    from fedjax_bn.execution.options import RoundOptions

Array = jax.Array
AUTO_CHUNK_SIZE = 256  # clients per chunk for ``chunked`` when RoundOptions.chunk_size is None


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
    result = RoundResult(*results[2], bad, ids_C)
    return FedState(server, clients, state.round + 1), result


def default_local_loop() -> LocalLoop:
    """``unroll`` on CPU (conv gradients in a while loop are several times slower there), else
    ``scan``."""
    return "unroll" if jax.default_backend() == "cpu" else "scan"


class LockstepExecutor:
    """One jitted round per static step plan, its clients run by ``run_group`` (vmapped,
    chunked or sharded); plans from real sizes only with ``num_groups > 1``."""

    def __init__(
        self,
        alg: Algorithm,
        run_group: GroupRunner,
        options: RoundOptions,
        mesh: Mesh | None = None,
        constrain: Callable[[FedState], FedState] | None = None,
    ) -> None:
        self.batch_size, self.local_epochs = options.batch_size, options.local_epochs
        self.num_groups = 1 if mesh is not None else options.num_groups or 1
        self.mesh = mesh
        self.exact_sizes = (options.num_groups or 1) > 1

        def round_fn(
            plan: Plan,
            state: FedState,
            train: ClientArrays,
            key: Array,
            batches: Any,
            budget: Any,
            ids: Any,
        ) -> tuple[FedState, RoundResult]:
            new_state, result = lockstep_round(
                alg, plan, run_group, state, train, key, batches, budget, ids
            )
            if constrain is not None and plan.num_clients % mesh.size == 0:
                new_state = constrain(new_state)
            return new_state, result

        self._round = jax.jit(round_fn, static_argnums=0)

    def plan(self, sizes: tuple[int, ...], n_max: int) -> Plan:
        """The static step plan for these client sizes."""
        multiple = self.mesh.size if self.mesh is not None else 1
        return make_plan(
            sizes,
            self.batch_size,
            self.local_epochs,
            n_max,
            num_groups=self.num_groups,
            multiple=multiple,
        )

    def padded_fraction(self, sizes: tuple[int, ...], n_max: int) -> float:
        """Share of the client-steps it runs that are masked no-ops (budgets not counted)."""
        return self.plan(sizes, n_max).padded_fraction()

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


def client_runner(alg: Algorithm, options: RoundOptions, chunk_size: int | None) -> GroupRunner:
    """A group function that runs its clients with :func:`run_clients` on this device."""
    loop = options.loop or default_local_loop()

    def run_group(group: Group, server: Any, inputs: Inputs) -> Outputs:
        return run_clients(alg, loop, chunk_size, group, server, inputs)

    return run_group


class VmapExecutor(LockstepExecutor):
    """``vmap``: every client of a group in one vmapped call (fills a GPU/TPU with many small
    clients)."""

    def __init__(self, alg: Algorithm, options: RoundOptions) -> None:
        super().__init__(alg, client_runner(alg, options, None), options)


class ChunkedExecutor(LockstepExecutor):
    """``chunked``: vmap over chunks of ``chunk_size`` clients, looping over the chunks inside
    the jit (``jax.lax.map(..., batch_size=k)``), to bound memory."""

    def __init__(self, alg: Algorithm, options: RoundOptions) -> None:
        chunk_size = options.chunk_size or AUTO_CHUNK_SIZE
        super().__init__(alg, client_runner(alg, options, chunk_size), options)
