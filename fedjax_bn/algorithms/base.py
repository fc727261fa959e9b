"""The algorithm protocol and the state layout every executor relies on (optax's shape).

An :class:`Algorithm` is a NamedTuple of pure functions built by a factory; it owns its math.
Executors (``fedjax_bn.execution``) own how clients run and call only these functions:

``init(rng_or_variables, sample_x, num_clients) -> FedState``
    the starting state; a PRNG key initializes the model, a variables dict (e.g. weights
    converted from another framework) is taken as the starting model.
``client_init(server, client) -> carry``
    a client's round starts from the replicated server state and its own client state;
``client_step(carry, batch) -> carry``
    one local optimizer step on a :class:`~fedjax_bn.client.Batch` (inputs, labels, mask and
    the step's PRNG key; a fully masked batch is a no-op), the same function under ``vmap``,
    ``scan``, ``shard_map`` or a host loop;
``client_final(carry) -> (message, client, metrics)``
    what the client sends, its new persistent state, and its round metrics;
``server_update(server, messages, weights_C) -> server``
    folds the stacked messages (every leaf ``[C, ...]``) back, weighted by ``weights_C``.

``stages`` (optional): ``((first_round, algorithm), ...)`` for an algorithm whose local step
changes at rounds known in advance (FixBN). The executors run round ``r`` with the functions
of the last stage whose ``first_round <= r`` (:func:`stage_at`), each stage compiled once, so
the switch is a host-side choice between programs instead of a ``lax.cond`` in every step.
Every stage has the same state layout; the algorithm's own functions stay valid for callers
that drive them directly.

``update_empty`` (default False): whether ``server_update`` must run on a round where no
client counts (all weights zero: an empty cohort, every client quarantined). Without it the
server state stays as it was; DP-FedAvg sets it, since its noise is released every round.

The state is ``FedState(server, clients, round)``: ``server`` is replicated; every leaf of
``clients`` has a leading client axis. Executors gather, run, scatter, place and shard
``clients`` by that layout, never by field names. An algorithm's server and client states are
its own NamedTuples; those holding a model carry ``shared`` and ``pooled`` (server) and
``local`` (client) so that :func:`model_parts` and the policy module can build models from them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bn.client import Batch, ClientMetrics
from fedjax_bn.policy import Parts, Policy, merge
from fedjax_bn.task import Task, as_task
from fedjax_bn.tree import Variables, check_same_structure

Array = jax.Array


class FedState(NamedTuple):
    """The whole federation: replicated ``server``, per-client ``clients`` ``[C, ...]``, round."""

    server: Any
    clients: Any
    round: Array


class Algorithm(NamedTuple):
    """A federated algorithm: its BN policy, model, and pure functions (see module docstring)."""

    name: str
    policy: Policy
    model: Any  # the user's model (Linen or NNX); calls go through task_of(alg)
    init: Callable[[Any, Array, int], FedState]
    client_init: Callable[[Any, Any], Any]
    client_step: Callable[[Any, Batch], Any]
    client_final: Callable[[Any], tuple[Any, Any, ClientMetrics]]
    server_update: Callable[[Any, Any, Array], Any]
    local: Any = None  # the LocalTraining spec where the algorithm has one (models, tests)
    stages: tuple[tuple[int, Any], ...] = ()  # ((first_round, Algorithm), ...), see above
    update_empty: bool = False  # server_update runs even when no client counts (DP's noise)
    compress: Any = None  # the Compressor of what clients send (fedjax_bn.compress), or None

    @property
    def task(self) -> Task:
        """The task (model, loss, metrics, augmentation) every call goes through."""
        return task_of(self)


def stage_at(alg: Algorithm, round_: Any) -> tuple[int, Algorithm]:
    """``(index, algorithm)`` of the stage that runs round ``round_``: ``(0, alg)`` without
    stages (the round is not read), else the last stage starting at or before it."""
    if not alg.stages:
        return 0, alg
    r = int(jax.device_get(round_))
    index = max((i for i, (first, _) in enumerate(alg.stages) if first <= r), default=0)
    return index, alg.stages[index][1]


def init_variables(model: Any, rng_or_variables: Any, sample_x: Any) -> Variables:
    """The starting model: ``task.init(rng)`` (a Linen init in eval mode; an NNX module's own
    values), or given variables checked against its shapes."""
    task = as_task(model)
    if isinstance(rng_or_variables, Mapping):
        want = jax.eval_shape(lambda x: task.init(jax.random.key(0), x), sample_x)
        given = jax.tree.map(jnp.asarray, dict(rng_or_variables))
        check_same_structure(dict(want), given, "given starting variables")
        return given
    if getattr(task.adapter, "is_nnx", False):  # values already exist: nothing to compile
        return task.init(rng_or_variables, sample_x)
    return jax.tree.map(jnp.asarray, dict(jitted_init(task)(rng_or_variables, sample_x)))


@functools.lru_cache(maxsize=64)
def jitted_init(task: Task) -> Any:
    """``task.init`` as one compiled program (an eager init would compile every layer's ops
    one by one, ~45), one jit per task so a second ``alg.init`` (another seed, a sweep's next
    point) reuses it. ``jit(compiler_options=)``, not ``lower().compile()``: callers trace
    ``alg.init`` too (``eval_shape``)."""
    return jax.jit(task.init, compiler_options=init_compiler_options())


def task_of(alg: Algorithm) -> Task:
    """The task ``alg`` trains and evaluates through (its local spec's, else the default one
    for ``alg.model``)."""
    return alg.local.task if alg.local is not None else as_task(alg.model)


INIT_OPT_LEVEL = 2  # XLA:CPU LLVM level of the init program (the default is 3)
LEVEL_FLAG = "xla_backend_optimization_level"


def init_compiler_options(backend: str | None = None) -> dict[str, Any]:
    """XLA options for the one-off init program (and the sequential executor's integer-only
    shuffle): on CPU, LLVM optimization level 2, not 3.

    At XLA:CPU's default level 3 the init (threefry bits and initializers, unrolled per
    parameter) compiles several times slower than at level 2 (figures and command in
    ``docs/startup.md``); it runs once, and its variables are bitwise those of level 3
    (``tests/test_algorithms.py``). The shuffle is integer-only, so no level changes its bits.
    The train steps gain nothing from a lower level (same compile seconds, and their results
    change), so they keep the default. A level set in ``XLA_FLAGS`` wins (the test suite
    compiles everything at level 0)."""
    if (backend or jax.default_backend()) != "cpu" or LEVEL_FLAG in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {LEVEL_FLAG: INIT_OPT_LEVEL}


def check_num_clients(num_clients: int) -> None:
    """Raise a ValueError unless there is at least one client."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")


def model_parts(state: FedState) -> Parts:
    """Global shared and pooled variables and the clients' stacked local leaves of a state."""
    return Parts(state.server.shared, state.server.pooled, state.clients.local)


def client_variables(state: FedState, c: int) -> Variables:
    """Client ``c``'s personal model: the global leaves plus its own local leaves."""
    local = jax.tree.map(lambda a: a[c], state.clients.local)
    return merge(state.server.shared, state.server.pooled, local)


def personal_variables(state: FedState, c: int) -> Variables:
    """Client ``c``'s own whole personal model where its algorithm keeps one (a ``personal``
    client field, Ditto) and it has trained (``rounds > 0``); else :func:`client_variables`."""
    personal = getattr(state.clients, "personal", None)
    if personal is None or int(jax.device_get(state.clients.rounds[c])) == 0:
        return client_variables(state, c)
    return jax.tree.map(lambda a: a[c], personal)
