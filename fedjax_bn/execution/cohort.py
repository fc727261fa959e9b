"""Cohort rounds: a sampled cohort of a population trains, everyone else sits out bit for bit.

``make_round(alg, cohort_size=K, sampler=...)`` returns a :class:`CohortRound`. Each round
(the ``fold_in`` streams are in ``streams.py``):

1. the round key is split by ``fold_in``: stream ``SAMPLER_STREAM`` for the sampler,
   ``EXECUTOR_STREAM`` for the executor (batch shuffling), so the cohort never correlates
   with the batches;
2. the sampler (``fedjax_bn.sampling``) draws ``K`` population ids from its key and
   ``state.round``;
3. the cohort's client states and data rows are gathered to the device (``store.py``: the
   population may live on the host), its data trimmed to a bucketed padded size;
4. the ordinary executor runs the cohort as if it were the whole population: the algorithm
   sees ``K`` clients and the unchanged server state (SCAFFOLD's ``server.num_clients`` stays
   ``N``, so its participation fraction is ``|S| / N``);
5. the cohort's new client states are scattered back; clients that sat out keep theirs bit for
   bit. The result is the executor's :class:`RoundResult`, whose ``clients`` are the cohort's
   ids.

Empty cohort slots (a sampler found fewer than ``K`` clients) get size 0: they take no step
and have weight 0, and their state is never written.

A budget (``make_round(budget=...)``, ``fedjax_bn.budgets``) is per population client id: it
is drawn for all ``N`` clients from the round key's ``BUDGET_STREAM`` and gathered for the
cohort (empty slots: 0).

No re-compilation. Shapes depend on the cohort through its padded size ``N_max`` (and so the
steps per epoch): it is bucketed to the next power of two, capped at the population's padded
size (:func:`size_bucket`), so a round compiles once per bucket. The sequential executor
reads sizes on the host only. The lockstep executors (vmap, chunked, sharded) compile a static
step plan from sizes (``Executor.exact_sizes`` is False); with one group it gets canonical sizes
``(lo, hi, ..., hi)``: ``hi`` the ``N_max`` bucket bounds every client's steps, and
``lo = hi // 2`` when every cohort client holds at least that many examples, else 0, bounds
the steps that run unmasked (full for all clients). So a lockstep cohort round compiles at
most twice per ``N_max`` bucket (:func:`bucket_key`). A finer ``lo`` (the smallest size itself)
would unmask a few more steps (a masked BatchNorm costs more on XLA:CPU) for up to one
plan per pair of size buckets. With ``num_groups > 1`` (or ``K = 1``) lockstep plans use the
real sizes: correct, but a new combination of sizes compiles a new plan. The sequential
executor compiles its per-call functions once per ``N_max`` bucket and call kind (full or
partial batch, first or last call of a client), a fixed set.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from fedjax_bn import sampling
from fedjax_bn.algorithms.base import FedState
from fedjax_bn.data import ClientArrays
from fedjax_bn.execution import store
from fedjax_bn.execution.executor import RoundResult
from fedjax_bn.execution.stages import Stages
from fedjax_bn.execution.streams import EXECUTOR_STREAM, SAMPLER_STREAM
from fedjax_bn.sampling import Sampler

Array = jax.Array
CohortResult = RoundResult  # the name cohort rounds' results had; one result type now


def size_bucket(n: int, cap: int) -> int:
    """The padded size for a cohort whose largest client holds ``n``: the next power of two
    (at least 1), capped at ``cap`` (the population's padded size)."""
    return min(cap, 1 << max(0, int(n) - 1).bit_length())


def size_buckets(cap: int) -> tuple[int, ...]:
    """Every value :func:`size_bucket` can take below ``cap``: 1, 2, 4, ..., and ``cap``."""
    return tuple(sorted({size_bucket(n, cap) for n in range(cap + 1)}))


def bucket_key(sizes: tuple[int, ...], cap: int) -> tuple[int, int]:
    """``(hi, lo)``: the cohort's padded-size bucket ``hi`` and ``lo``, ``hi // 2`` when every
    client holds at least that many examples, else 0 (``lo <= min(sizes)``, always)."""
    hi = size_bucket(max(sizes), cap)
    return hi, hi // 2 if min(sizes) >= hi // 2 else 0


def plan_sizes(sizes: tuple[int, ...], cap: int, exact: bool) -> tuple[int, ...]:
    """The sizes an executor plans from: the real ones (``exact``) or canonical
    ``(lo, hi, ..., hi)`` that bound every client's steps (module docstring)."""
    if exact or len(sizes) < 2:
        return sizes
    hi, lo = bucket_key(sizes, cap)
    return (lo,) + (hi,) * (len(sizes) - 1)


class CohortRound:
    """A round function ``(state, population_train, key) -> (state, RoundResult)`` (module
    docstring) of the executors ``stages`` (several cohort rounds may share them, and so their
    compiled programs); the other arguments are ``RoundOptions``' (checked there).
    ``state.clients`` and ``population_train`` hold the whole population; ``placement`` is
    where the client state lives (``auto`` resolved at the first call); ``buckets`` the
    ``(hi, lo)`` bucket keys run so far."""

    def __init__(
        self,
        stages: Stages,
        *,
        cohort_size: int,
        sampler: str | Sampler,
        state_placement: store.Placement,
        donate_state: bool = False,
    ) -> None:
        self.stages, self.cohort_size, self.sampler = stages, cohort_size, sampler
        self.requested_placement = state_placement
        self.donate_state = donate_state
        self.placement: str | None = None if state_placement == "auto" else state_placement
        self.buckets: set[tuple[int, int]] = set()
        self._sizes: tuple[tuple[int, ...], np.ndarray, Sampler] | None = None

    @property
    def executor(self) -> str | None:
        """The executor that runs each cohort (``auto`` resolved at the first call)."""
        return self.stages.executor

    def population_sizes(self, train: ClientArrays) -> np.ndarray:
        """Host copy of every client's size (checked and cached by ``Stages.sizes``)."""
        sizes = self.stages.sizes(train)
        if self._sizes is None or self._sizes[0] is not sizes:
            host = np.asarray(sizes, np.int64)
            self._sizes = (sizes, host, sampling.sampler_for(self.sampler, host))
        return self._sizes[1]

    def sample(self, key: Array, round_: Array | int, train: ClientArrays) -> np.ndarray:
        """The cohort's ids on the host, from the sampler's own stream of the round key."""
        num = len(self.population_sizes(train))
        fn = self._sizes[2]  # bound to the population's sizes (by_size)
        ids = fn(jax.random.fold_in(key, SAMPLER_STREAM), round_, num, self.cohort_size)
        return np.asarray(jax.device_get(ids))

    def __call__(
        self, state: FedState, train: ClientArrays, key: Array
    ) -> tuple[FedState, RoundResult]:
        sizes_N = self.population_sizes(train)
        num = len(sizes_N)
        sampling.check_cohort(num, self.cohort_size)
        check_population(state.clients, num)
        if self.placement is None:
            self.placement = store.resolve_placement("auto", store.tree_nbytes(state.clients))
        population = store.place(state.clients, self.placement)
        ids = self.sample(key, state.round, train)
        keep = ids < num
        sizes = tuple(int(n) for n in np.where(keep, sizes_N[np.minimum(ids, num - 1)], 0))
        cap = int(train.n_max)
        hi, lo = bucket_key(sizes, cap)
        self.buckets.add((hi, lo))
        cohort = store.gather_data(train, ids, hi)
        clients = store.gather(population, ids, num)
        impl = self.stages.executor_for(len(ids), state.round)
        sub = FedState(state.server, clients, state.round)
        run_key = jax.random.fold_in(key, EXECUTOR_STREAM)
        budget = cohort_budget(self.stages.draw_budget(key, state.round, num), ids)
        planned = plan_sizes(sizes, hi, impl.exact_sizes)
        wire = self.stages.wire(sub)
        new, result = impl(sub, cohort, run_key, planned, None, budget, ids)
        population = store.scatter(population, ids, new.clients, num, in_place=self.donate_state)
        result = self.stages.with_bytes(wire, result, num)
        return FedState(new.server, population, new.round), result


def cohort_budget(budget_N: np.ndarray | None, ids: np.ndarray) -> np.ndarray | None:
    """The cohort's budgets from the population's (per population id); empty slots get 0."""
    if budget_N is None:
        return None
    num = len(budget_N)
    return np.where(ids < num, budget_N[np.minimum(ids, num - 1)], 0).astype(np.int32)


def check_population(clients: Any, num_clients: int) -> None:
    """Raise a ValueError unless every client-state leaf has ``num_clients`` rows."""
    rows = {int(np.shape(x)[0]) for x in jax.tree.leaves(clients)}
    if rows - {num_clients}:
        raise ValueError(
            f"state.clients has leading axes {sorted(rows)}, but the population data has "
            f"{num_clients} clients; pass the whole population's state and data."
        )
