"""Many runs in one program: S runs of one configuration trained as one batched federation.

``vmap_runs(alg, ...)`` returns a round function over *stacked* federations: every leaf of the
state, the data (or not, when every run trains on the same data) and the round keys has a
leading run axis ``R``. It vmaps the lockstep executors' pure round
(``execution.lockstep.lockstep_round``) over that axis, so run ``r`` of a batched round computes
what ``make_round(alg, executor="vmap")`` computes for it alone, up to float reassociation
(vmap may reorder reductions); BN statistics, optimizer states and integer leaves batch like
any other leaf. Seeds are data: different init keys (stack the S initial states), batch orders
(one round key per run) and partitions of the same shapes (stack the S ``ClientArrays``).

Only the client axis inside a run is an executor choice (``vmap``, or ``chunked`` via
``chunk_size``); cohorts, budgets and the sequential / sharded executors are not batched.
On XLA:CPU a vmap over runs of distinct conv weights is usually slower than running the
runs one after another (``docs/execution.md``, ``benchmarks/parallel_runs.py``); on a GPU it
fills the device with S federations at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn.algorithms.base import Algorithm, FedState, stage_at
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution.executor import RoundResult
from fedjax_bn.execution.lockstep import (
    default_local_loop,
    lockstep_round,
    run_clients,
)
from fedjax_bn.execution.loop import LocalLoop, check_loop
from fedjax_bn.execution.plan import Plan, make_plan

Array = jax.Array


def _shapes(tree: Any) -> list[tuple[str, tuple[int, ...], Any]]:
    """``(path, shape, dtype)`` of every leaf of ``tree``."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return [(jax.tree_util.keystr(p), tuple(np.shape(a)), jnp.result_type(a)) for p, a in leaves]


def stack_runs(trees: Sequence[Any], what: str = "runs") -> Any:
    """The runs' pytrees (states, ``ClientArrays``, keys) stacked on a new leading run axis.

    Raises a ValueError naming the first leaf whose structure, shape or dtype differs between
    runs: batched runs need data of the same shapes (same clients and padded size ``N_max``)."""
    trees = list(trees)
    if not trees:
        raise ValueError(f"stack_runs needs at least one run of {what}.")
    first_def = jax.tree.structure(trees[0])
    first = _shapes(trees[0])
    for r, tree in enumerate(trees[1:], start=1):
        if jax.tree.structure(tree) != first_def:
            raise ValueError(f"run {r}'s {what} has another tree structure than run 0's.")
        for (path, shape0, dtype0), (_, shape, dtype) in zip(first, _shapes(tree), strict=True):
            if (shape, dtype) != (shape0, dtype0):
                raise ValueError(
                    f"runs' {what} differ at {path}: run 0 has {dtype0}{list(shape0)}, run {r} "
                    f"{dtype}{list(shape)}; batched runs need the same shapes (same number of "
                    "clients and the same padded client size N_max): pad the data to a common "
                    "N_max, or train these runs separately."
                )
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack_run(stacked: Any, r: Any) -> Any:
    """Run ``r``'s slice of a stacked pytree (a state, a ``RoundResult``, data); jittable with
    ``r`` traced, so one compiled program serves every run."""
    return jax.tree.map(lambda a: a[r], stacked)


def num_runs(stacked_state: FedState) -> int:
    """The number of runs ``R`` of a stacked federation state."""
    return int(np.shape(stacked_state.round)[0])


def runs_plan(sizes_RC: np.ndarray, batch_size: int, epochs: int, n_max: int) -> Plan:
    """One static step plan valid for every run: steps up to the largest client of any run,
    unmasked only the steps that are full for every client of every run (the rest are masked,
    and a fully masked step is a no-op), so runs may hold different partitions."""
    return make_plan(np.asarray(sizes_RC).reshape(-1).tolist(), batch_size, epochs, n_max)


class RunsRound:
    """A round over R stacked runs: ``(states, train, keys) -> (states, RoundResult)``, every
    output leaf with a leading run axis. ``train``: one ``ClientArrays`` for every run (leaves
    ``[C, N_max, ...]``) or one per run, stacked (``[R, C, N_max, ...]``, ``n`` ``[R, C]``)."""

    def __init__(
        self,
        alg: Algorithm,
        *,
        batch_size: int,
        local_epochs: int,
        loop: LocalLoop,
        chunk_size: int | None,
    ) -> None:
        self.alg, self.batch_size, self.local_epochs = alg, batch_size, local_epochs
        self.loop, self.chunk_size = loop, chunk_size
        self._rounds: dict[int, Any] = {}  # one jitted round per stage of the algorithm
        self._sizes_of: Array | None = None
        self._sizes: np.ndarray = np.zeros((0, 0), np.int64)

    def _round_of(self, stage: int, alg: Algorithm) -> Any:
        if stage not in self._rounds:
            loop, chunk = self.loop, self.chunk_size

            def run_group(group, server, inputs):
                return run_clients(alg, loop, chunk, group, server, inputs)

            def one_run(plan: Plan, state: FedState, train: ClientArrays, key: Array):
                return lockstep_round(alg, plan, run_group, state, train, key)

            def batched(plan: Plan, shared: bool, states: FedState, train: Any, keys: Array):
                in_axes = (0, None if shared else 0, 0)
                return jax.vmap(lambda s, t, k: one_run(plan, s, t, k), in_axes=in_axes)(
                    states, train, keys
                )

            self._rounds[stage] = jax.jit(batched, static_argnums=(0, 1))
        return self._rounds[stage]

    def sizes(self, train: ClientArrays) -> np.ndarray:
        """Host copy of every run's client sizes ``[R or 1, C]``, read once per ``n`` array."""
        if train.n is not self._sizes_of:
            sizes = np.asarray(jax.device_get(train.n)).astype(np.int64)
            sizes = sizes.reshape(-1, sizes.shape[-1])
            if np.any(sizes.sum(axis=1) <= 0):
                raise ValueError("a run has no training example in any client: nothing to train.")
            self._sizes, self._sizes_of = sizes, train.n
        return self._sizes

    def __call__(
        self, states: FedState, train: ClientArrays, keys: Array
    ) -> tuple[FedState, RoundResult]:
        """One round of every run; ``keys``: the runs' round keys ``[R]``."""
        runs = num_runs(states)
        if np.shape(keys)[:1] != (runs,):
            raise ValueError(f"give one round key per run: {runs} runs, keys {np.shape(keys)}.")
        shared = np.ndim(train.n) == 1
        if not shared and np.shape(train.n)[0] != runs:
            raise ValueError(
                f"the data holds {np.shape(train.n)[0]} runs, the state {runs}: stack one "
                "ClientArrays per run (fb.stack_runs), or pass one for every run."
            )
        n_max = train.n_max if shared else unstack_run(train, 0).n_max  # axis 2 when stacked
        plan = runs_plan(self.sizes(train), self.batch_size, self.local_epochs, n_max)
        stage, alg = stage_at(self.alg, states.round[0])  # runs advance together
        return self._round_of(stage, alg)(plan, shared, states, train, keys)


def vmap_runs(
    alg: Algorithm,
    *,
    batch_size: int = 32,
    local_epochs: int = 1,
    loop: LocalLoop | None = None,
    chunk_size: int | None = None,
) -> RunsRound:
    """A round function of R runs of ``alg`` batched into one program (see module docstring).

    ``states`` are ``stack_runs([alg.init(key_r, ...) for each run])``; the keys ``[R]`` one
    round key per run; ``train`` shared or stacked. ``loop``: local steps as ``scan`` or
    ``unroll`` (default: unroll on CPU, scan elsewhere); ``chunk_size``: clients of a run
    vmapped ``chunk_size`` at a time (``lax.map``), None: all at once.
    """
    if batch_size < 1 or local_epochs < 1:
        raise ValueError(
            f"batch_size and local_epochs must be >= 1, got {batch_size} and {local_epochs}."
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    if loop is not None:
        check_loop(loop)
    return RunsRound(
        alg,
        batch_size=batch_size,
        local_epochs=local_epochs,
        loop=loop or default_local_loop(),
        chunk_size=chunk_size,
    )
