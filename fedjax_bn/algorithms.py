"""FedAvg, FedProx, FedBN and SiloBN as one factory over a BN policy (optax's shape).

An :class:`Algorithm` is a NamedTuple of pure functions: ``init`` builds the :class:`ServerState`,
``client_variables`` gives client ``c`` its starting model, ``server_update`` folds the clients'
results back. How clients are run (vmapped, sequential, sharded) lives in ``execute.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_bn.aggregate import pool_batch_stats, weighted_mean
from fedjax_bn.client import ClientResult, LocalTraining
from fedjax_bn.models import require_train_keyword
from fedjax_bn.tree import Policy, Variables, check_policy, check_same_structure, merge, partition

Array = jax.Array


class ServerState(NamedTuple):
    """Everything the federation carries between rounds.

    ``shared``: global shared variables; ``pooled``: global pooled BN statistics (fedavg, else
    empty); ``local``: every client's local leaves stacked on a leading client axis;
    ``client_opt``: stacked client optimizer states when they persist across rounds, else None.
    """

    shared: Variables
    pooled: Variables
    local: Variables
    client_opt: Any
    round: Array


class Algorithm(NamedTuple):
    """A federated algorithm: its BN policy, local training, and pure server functions."""

    name: str
    policy: Policy
    local: LocalTraining
    init: Callable[[Array, Array, int], ServerState]
    client_variables: Callable[[ServerState, Variables], Variables]
    server_update: Callable[[ServerState, ClientResult, Array], ServerState]


def stack_clients(tree: Any, num_clients: int) -> Any:
    """Every leaf repeated along a new leading client axis."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients, *jnp.shape(x))), tree)


def take_client(stacked: Any, c: Array | int) -> Any:
    """Client ``c``'s slice of a stacked tree."""
    return jax.tree.map(lambda x: x[c], stacked)


def make_algorithm(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    policy: Policy,
    mu: float = 0.0,
    bn_train: bool = True,
    persist_client_optimizer: bool = False,
    name: str | None = None,
) -> Algorithm:
    """Build an algorithm from a BN policy (see ``tree.py``) and local-training options.

    ``mu`` > 0 adds FedProx's proximal term over the shared parameters. ``bn_train=False``
    reproduces the original bug (BN in eval mode while training) on purpose, as an ablation.
    ``persist_client_optimizer`` keeps each client's optimizer state across rounds instead of
    starting a fresh optimizer every round.
    """
    check_policy(policy)
    require_train_keyword(model)
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}.")
    spec = LocalTraining(model=model, tx=client_tx, mu=float(mu), bn_train=bn_train)

    def init(rng: Array, sample_x: Array, num_clients: int) -> ServerState:
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
        variables = model.init(rng, sample_x, train=False)
        variables = jax.tree.map(jnp.asarray, dict(variables))
        parts = partition(variables, policy)
        client_opt = None
        if persist_client_optimizer:
            client_opt = stack_clients(client_tx.init(variables["params"]), num_clients)
        return ServerState(
            parts.shared,
            parts.pooled,
            stack_clients(parts.local, num_clients),
            client_opt,
            jnp.zeros((), jnp.int32),
        )

    def client_variables(state: ServerState, local: Variables) -> Variables:
        """Client's starting model: global shared + pooled leaves and its own local leaves."""
        return merge(state.shared, state.pooled, local)

    def server_update(state: ServerState, results: ClientResult, weights_C: Array) -> ServerState:
        """Average shared leaves by ``weights_C``; pool BN stats (fedavg); keep local per client."""
        parts = partition(results.variables, policy)
        check_same_structure(
            stack_clients(state.shared, len(weights_C)), parts.shared, "client shared variables"
        )
        check_same_structure(state.local, parts.local, "client local variables")
        pooled = parts.pooled and pool_batch_stats(parts.pooled, weights_C, state.pooled)
        return ServerState(
            weighted_mean(parts.shared, weights_C, state.shared),
            pooled,
            parts.local,
            results.opt_state if persist_client_optimizer else None,
            state.round + 1,
        )

    label = name or (policy if mu == 0 else f"{policy}+prox")
    return Algorithm(label, policy, spec, init, client_variables, server_update)


def fedavg(model: nn.Module, client_tx: optax.GradientTransformation, **kw: Any) -> Algorithm:
    """FedAvg (McMahan 2017): every parameter averaged, BN statistics pooled."""
    return make_algorithm(model, client_tx, policy="fedavg", name=kw.pop("name", "fedavg"), **kw)


def fedprox(
    model: nn.Module, client_tx: optax.GradientTransformation, mu: float, **kw: Any
) -> Algorithm:
    """FedProx (Li et al. 2020): FedAvg plus ``mu/2 ||w - w_global||^2`` on every client."""
    kw.setdefault("policy", "fedavg")
    return make_algorithm(model, client_tx, mu=mu, name=kw.pop("name", "fedprox"), **kw)


def fedbn(model: nn.Module, client_tx: optax.GradientTransformation, **kw: Any) -> Algorithm:
    """FedBN (Li et al., ICLR 2021): BN layers (affine and statistics) stay with each client."""
    return make_algorithm(model, client_tx, policy="fedbn", name=kw.pop("name", "fedbn"), **kw)


def silobn(model: nn.Module, client_tx: optax.GradientTransformation, **kw: Any) -> Algorithm:
    """SiloBN (Andreux et al. 2020): BN affine averaged, BN statistics kept per client."""
    return make_algorithm(model, client_tx, policy="silobn", name=kw.pop("name", "silobn"), **kw)


def fedbn_prox(
    model: nn.Module, client_tx: optax.GradientTransformation, mu: float, **kw: Any
) -> Algorithm:
    """FedProx with local BN: FedBN's policy plus the proximal term on the shared parameters."""
    return make_algorithm(
        model, client_tx, policy="fedbn", mu=mu, name=kw.pop("name", "fedbn_prox"), **kw
    )
