"""Per-client budgets of local steps: stragglers and heterogeneous work.

A budget is the most local optimizer steps a client takes in a round, counting the steps that
see at least one real example (``LocalState.steps``), in the round's batch order. A client
stops early when its budget runs out; a budget at least its real steps changes nothing; budget
0 makes it a client with no data this round (no step, weight 0, its state kept).

``make_round(alg, budget=...)`` takes ``None`` (no limit), one int per client (fixed, see
:func:`fixed`) or a :data:`Budget`: a pure function ``(key, round, num_clients) -> int [C]``
drawn per round (:func:`uniform_steps`). With ``cohort_size`` a budget is per population
client id (``num_clients`` is the population's size), gathered for the cohort.

Budgets are data, not static: the lockstep executors mask the steps past a client's budget
(no re-compilation when budgets change), ``sequential`` skips them (fewer jitted calls).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
# (key, round, num_clients) -> int [num_clients]: each client's most local steps this round.
Budget = Callable[[Array, Array | int, int], Array | np.ndarray]
UNLIMITED = int(np.iinfo(np.int32).max)  # a budget entry that never binds


def check_budget(budget_C: Array | np.ndarray | Sequence[int], num_clients: int) -> np.ndarray:
    """``budget_C`` as a host int32 ``[num_clients]`` array; a ValueError for a wrong shape,
    non-integer or negative entries. Entries above ``UNLIMITED`` are clipped to it."""
    host = np.asarray(jax.device_get(budget_C))
    if host.shape != (num_clients,):
        raise ValueError(
            f"a budget needs one entry per client, shape ({num_clients},), got {host.shape} "
            "(with cohort_size, one per population client id)."
        )
    whole = np.issubdtype(host.dtype, np.integer) or (
        np.issubdtype(host.dtype, np.floating) and bool(np.all(host == np.round(host)))
    )
    if host.size and not whole:
        raise ValueError(f"budgets must be whole numbers of steps, got {host.tolist()}.")
    if np.any(host < 0):
        raise ValueError(f"budgets must be >= 0 steps, got {host.tolist()}.")
    return np.minimum(host, UNLIMITED).astype(np.int32)


def fixed(steps_C: Sequence[int] | np.ndarray) -> Budget:
    """The same budget every round: ``steps_C[c]`` steps for client ``c``."""
    steps = np.asarray(steps_C)
    if steps.ndim != 1:
        raise ValueError(f"a fixed budget is a 1-D list of steps per client, got {steps.shape}.")
    steps = check_budget(steps, steps.shape[0])

    def budget(key: Array, round_: Array | int, num_clients: int) -> np.ndarray:
        return check_budget(steps, num_clients)

    return budget


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _uniform(key: Array, round_: Array, num_clients: int, low: int, high: int) -> Array:
    return jax.random.randint(jax.random.fold_in(key, round_), (num_clients,), low, high + 1)


def uniform_steps(low: int, high: int) -> Budget:
    """Each client's budget drawn uniformly from ``{low, ..., high}`` every round
    (independently per client): the straggler model of FedNova's experiments (Wang et al.
    2020), where clients run a random number of local steps."""
    if not 0 <= low <= high:
        raise ValueError(f"uniform_steps needs 0 <= low <= high, got low={low}, high={high}.")

    def budget(key: Array, round_: Array | int, num_clients: int) -> Array:
        return _uniform(key, jnp.asarray(round_), num_clients, int(low), int(high))

    return budget


def budget_weights(n_C: Array, budget_C: Array) -> Array:
    """Aggregation weights under a budget: a client's size ``n_c`` (FedAvg's and FedNova's
    ``p_c``), 0 for a client with budget 0 (it trained on nothing)."""
    n_C = jnp.asarray(n_C)
    return jnp.where(jnp.asarray(budget_C) > 0, n_C, jnp.zeros_like(n_C))


def as_budget(budget: Budget | Sequence[int] | np.ndarray | None) -> Budget | None:
    """``make_round``'s ``budget`` argument as a :data:`Budget` (a list becomes :func:`fixed`)."""
    if budget is None or callable(budget):
        return budget
    return fixed(budget)


def draw(
    budget: Budget | None, key: Array, round_: Array | int, num_clients: int
) -> np.ndarray | None:
    """This round's budgets on the host (checked), or None without a budget. A drawn budget
    is read back once per round (a tiny device-to-host copy)."""
    if budget is None:
        return None
    return check_budget(budget(key, round_, num_clients), num_clients)
