"""FedAvg, FedProx, FedBN, SiloBN and the server-optimizer family as one factory over a BN policy.

The client side trains the merged model (global shared + pooled leaves, its own local leaves)
with :func:`fedjax_bn.client.train_step`; the server side averages what the policy shares,
pools or averages BN statistics, and may step the averaged parameters with a server optimizer
(Reddi et al. 2021): ``server_tx`` sees the pseudo-gradient ``global - weighted mean`` of the
shared *float* parameters only; BN running statistics are pooled, never stepped; integer leaves
keep their value and dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_bn import client as client_lib
from fedjax_bn.aggregate import normalized_mean, weighted_mean
from fedjax_bn.algorithms.base import (
    Algorithm,
    FedState,
    check_num_clients,
    init_variables,
)
from fedjax_bn.client import Batch, ClientMetrics, LocalState, LocalTraining
from fedjax_bn.policy import (
    BN_STATS,
    BnStats,
    LocalSpec,
    Policy,
    check_policy,
    float_leaves,
    merge,
    partition,
    pool_batch_stats,
    with_leaves,
)
from fedjax_bn.privacy.dp_fedavg import privatize
from fedjax_bn.privacy.gaussian import Gaussian
from fedjax_bn.robust import Aggregator, aggregate, aggregate_batch_stats
from fedjax_bn.task import Augment, PerExample, make_task
from fedjax_bn.tree import Variables, check_same_structure, repeat_clients

Array = jax.Array
NORMALIZE: tuple[str | None, ...] = (None, "fednova")  # server averaging: plain or FedNova


class ServerState(NamedTuple):
    """Replicated: global shared variables, pooled BN statistics, server optimizer state."""

    shared: Variables
    pooled: Variables
    opt_state: Any = None  # server_tx state over the shared float leaves; None without one


class ClientState(NamedTuple):
    """Per client (leading client axis): local leaves, persistent client optimizer state."""

    local: Variables
    opt_state: Any = None  # None when every round starts a fresh client optimizer


class Message(NamedTuple):
    """What a client sends: its shared and poolable leaves after local training, and with
    ``normalize="fednova"`` its number of local steps ``tau`` (None otherwise)."""

    shared: Variables
    pooled: Variables
    steps: Array | None = None


class Carry(NamedTuple):
    """A client mid-round: its local training state and the FedProx anchor (None if mu=0)."""

    local: LocalState
    anchor: Variables | None


def server_tx_init(server_tx: optax.GradientTransformation | None, shared: Variables) -> Any:
    """The server optimizer's state over the shared float leaves (None without one)."""
    return None if server_tx is None else server_tx.init(float_leaves(shared))


def server_step(
    server_tx: optax.GradientTransformation | None,
    shared: Variables,
    opt_state: Any,
    mean: Variables,
) -> tuple[Variables, Any]:
    """New shared variables from the clients' weighted ``mean``.

    Without ``server_tx`` the mean is the new model (FedAvg). With it, the pseudo-gradient
    ``shared - mean`` of the float leaves is stepped: ``optax.sgd(1.0)`` gives the mean back.
    """
    if server_tx is None:
        return mean, opt_state
    old, new = float_leaves(shared), float_leaves(mean)
    grads = {p: (old[p] - new[p]).astype(old[p].dtype) for p in old}
    updates, opt_state = server_tx.update(grads, opt_state, old)
    return with_leaves(shared, optax.apply_updates(old, updates)), opt_state


def clip_updates(shared_C: Variables, server: Variables, max_norm: float) -> Variables:
    """Each client's update ``shared_c - server`` (float leaves) scaled to L2 norm at most
    ``max_norm``; integer leaves untouched."""
    old, new = float_leaves(server), float_leaves(shared_C)
    sq = sum(jnp.sum(jnp.square(new[p] - old[p]).reshape(new[p].shape[0], -1), axis=1) for p in old)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(jnp.sqrt(sq), 1e-12))

    def clip(p: Any) -> Array:
        delta = (new[p] - old[p]) * scale.reshape((-1,) + (1,) * old[p].ndim)
        return (old[p] + delta).astype(new[p].dtype)

    return with_leaves(shared_C, {p: clip(p) for p in old})


def check_aggregation(bn_stats: str, aggregator: Aggregator | None, normalize: str | None) -> None:
    """One clear ValueError for an unknown ``bn_stats`` or a combination that has no meaning."""
    if bn_stats not in (*BN_STATS, "robust"):
        raise ValueError(f"Unknown bn_stats {bn_stats!r}; valid: {', '.join(BN_STATS)}, robust.")
    if bn_stats == "robust" and aggregator is None:
        raise ValueError("bn_stats='robust' needs an aggregator (e.g. fedjax_bn.robust.median()).")
    if aggregator is not None and not isinstance(aggregator, Aggregator):
        raise ValueError(f"aggregator must be a fedjax_bn.robust.Aggregator, got {aggregator!r}.")
    if aggregator is not None and normalize is not None:
        raise ValueError("normalize='fednova' and a robust aggregator cannot be combined.")


def make_algorithm(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    policy: Policy,
    mu: float = 0.0,
    bn_train: bool = True,
    persist_client_optimizer: bool = False,
    server_tx: optax.GradientTransformation | None = None,
    bn_stats: BnStats | Literal["robust"] | None = None,
    aggregator: Aggregator | None = None,
    clip_norm: float | None = None,
    normalize: str | None = None,
    local: LocalSpec = (),
    name: str | None = None,
    loss: PerExample | None = None,
    metrics: Mapping[str, PerExample] | None = None,
    augment: Augment | None = None,
    train_kw: str = "train",
    dp: Gaussian | None = None,
) -> Algorithm:
    """Build an algorithm from a BN policy (``policy.py``) and local/server options.

    ``mu`` > 0 adds FedProx's proximal term over the shared parameters. ``bn_train=False``
    reproduces the original bug (BN in eval mode while training) on purpose, as an ablation.
    ``persist_client_optimizer`` keeps each client's optimizer state across rounds.
    ``server_tx``: an optax transform stepping the averaged shared float parameters (FedAvgM,
    FedAdam, ...). ``aggregator``: a robust rule (``fedjax_bn.robust``) folding the shared
    float leaves instead of the weighted mean (None: the weighted mean, as before).
    ``bn_stats``: how fedavg folds BN running statistics, ``"pooled"`` (the statistics of the
    union of the clients' data), ``"mean"`` (the plain weighted mean of each statistic, as
    PyTorch loops and Flower do) or ``"robust"`` (``aggregator``'s rule, variances kept >= 0);
    None: ``"robust"`` with an aggregator, else ``"pooled"``. ``clip_norm``: each client's update of
    the shared float parameters is scaled to at most this L2 norm before averaging (a guard
    against exploding clients, next to the executors' NaN quarantine). ``normalize="fednova"``:
    FedNova's normalized averaging of the shared float parameters (``algorithms/fednova.py``).
    ``local``: modules kept per client under any policy (personalization, ``policy.py``): names
    matched as module-path components (``("Dense_1",)``: FedPer's head), ``AllBut(names)``
    (LG-FedAvg's body) or a predicate over module paths; their ``params`` and ``batch_stats``
    never leave the client. A name that matches no module is a ValueError at ``init``.

    The task (``fedjax_bn.task``): ``model`` is a Linen module as written (its mode parameter,
    ``train`` or ``train_kw``, is passed by keyword at every call whatever its default) or an
    NNX module (its BN and dropout modes set at every call); ``loss(outputs, y) -> [B]``
    (default: softmax cross-entropy on integer labels); ``metrics={name: fn(outputs, y) ->
    [B]}`` (default accuracy with the default loss, none with a custom one); ``augment(key,
    x_B) -> x_B`` runs in the jitted step on training batches only.

    ``dp=fedjax_bn.privacy.gaussian(noise_multiplier=, clip_norm=)``: DP-FedAvg (McMahan et
    al. 2018): each client's update of everything it sends is clipped jointly, the server
    noises the sum and divides by the expected cohort size (uniform weights). Under
    ``fedavg`` the BN statistics travel inside the clipped, noised update; under ``fedbn`` and
    ``silobn`` they stay local (``fedjax_bn/privacy/dp_fedavg.py``, ``docs/privacy.md``).
    None (default): no DP, this function's algorithm exactly as without the option.
    """
    check_policy(policy)
    check_dp(dp, clip_norm=clip_norm, normalize=normalize, aggregator=aggregator)
    task = make_task(model, loss=loss, metrics=metrics, augment=augment, train_kw=train_kw)
    if mu < 0:
        raise ValueError(f"FedProx mu must be >= 0, got {mu}.")
    if clip_norm is not None and clip_norm <= 0:
        raise ValueError(f"clip_norm must be > 0 (or None for no clipping), got {clip_norm}.")
    if normalize not in NORMALIZE:
        raise ValueError(f"Unknown normalize {normalize!r}; valid: None, 'fednova'.")
    bn_stats = bn_stats or ("robust" if aggregator is not None else "pooled")
    check_aggregation(bn_stats, aggregator, normalize)
    spec = LocalTraining(model=task, tx=client_tx, mu=float(mu), bn_train=bn_train)

    def init(rng_or_variables: Any, sample_x: Array, num_clients: int) -> FedState:
        check_num_clients(num_clients)
        variables = init_variables(task, rng_or_variables, sample_x)
        parts = partition(variables, policy, local)
        opt = client_tx.init(variables["params"]) if persist_client_optimizer else None
        server = ServerState(parts.shared, parts.pooled, server_tx_init(server_tx, parts.shared))
        clients = repeat_clients(ClientState(parts.local, opt), num_clients)
        return FedState(server, clients, jnp.zeros((), jnp.int32))

    def client_init(server: ServerState, client: ClientState) -> Carry:
        variables = merge(server.shared, server.pooled, client.local)
        local = client_lib.init_state(spec, variables, client.opt_state)
        return Carry(local, server.shared if mu else None)

    def client_step(carry: Carry, batch: Batch) -> Carry:
        local = client_lib.train_step(spec, carry.anchor, carry.local, batch)
        return carry._replace(local=local)

    def client_final(carry: Carry) -> tuple[Message, ClientState, ClientMetrics]:
        parts = partition(carry.local.variables, policy, local)
        opt = carry.local.opt_state if persist_client_optimizer else None
        metrics = client_lib.metrics(carry.local)
        steps = carry.local.steps if normalize else None
        return Message(parts.shared, parts.pooled, steps), ClientState(parts.local, opt), metrics

    def server_update(server: ServerState, messages: Message, weights_C: Array) -> ServerState:
        check_same_structure(
            repeat_clients(server.shared, len(weights_C)), messages.shared, "client shared"
        )
        shared_C = messages.shared
        if clip_norm is not None:
            shared_C = clip_updates(shared_C, server.shared, clip_norm)
        if aggregator is not None:
            mean = aggregate(aggregator, shared_C, weights_C, server.shared)
        elif normalize is None:
            mean = weighted_mean(shared_C, weights_C, server.shared)
        elif messages.steps is None:
            raise ValueError("normalize='fednova' needs each client's steps in Message.steps.")
        else:
            mean = normalized_mean(shared_C, weights_C, messages.steps, server.shared)
        shared, opt_state = server_step(server_tx, server.shared, server.opt_state, mean)
        if bn_stats == "robust":
            pooled = server.pooled and aggregate_batch_stats(
                aggregator, messages.pooled, weights_C, server.pooled
            )
        else:
            pooled = server.pooled and pool_batch_stats(
                messages.pooled, weights_C, server.pooled, bn_stats
            )
        return ServerState(shared, pooled, opt_state)

    label = name or (policy if mu == 0 else f"{policy}+prox")
    alg = Algorithm(
        label, policy, model, init, client_init, client_step, client_final, server_update, spec
    )
    if dp is None:
        return alg
    return privatize(alg, dp, server_step=functools.partial(server_step, server_tx), how=bn_stats)


def check_dp(
    dp: Gaussian | None,
    *,
    clip_norm: float | None,
    normalize: str | None,
    aggregator: Aggregator | None = None,
) -> None:
    """Raise a clear error for a DP option this family cannot honour."""
    if dp is None:
        return
    if not isinstance(dp, Gaussian):
        raise TypeError(f"dp must come from fedjax_bn.privacy.gaussian(...), got {type(dp)}.")
    if aggregator is not None:
        raise ValueError(
            "dp and aggregator do not compose yet: DP-FedAvg's noise is calibrated to a clipped "
            "sum, not to a robust rule. Use one of them."
        )
    if clip_norm is not None:
        raise ValueError("dp clips each client's update itself (dp.clip_norm); pass no clip_norm.")
    if normalize is not None:
        raise ValueError(
            "DP is not available with normalize='fednova' (FedNova): each client's local "
            "step count would leave it un-noised. Use DP with fedavg, fedprox, fedbn, silobn "
            "or a server optimizer (fedavgm, fedadam, ...)."
        )


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
