"""FixBN (Zhong, Chen, Chao, "Making Batch Normalization Great in Federated Deep Learning",
arXiv 2303.06530): FedAvg with BN until ``fix_round``, then BN frozen on the global statistics.

Two phases, switched by the server's own round counter ``r`` (the executors do not pass the
round to client functions, so it travels in :class:`FixBNServer`):

- ``r < fix_round`` (exploration): exactly FedAvg. Local training normalizes with batch
  statistics (``train=True``) and the server pools the clients' running statistics into the
  statistics of the union of their data (``bn_stats="pooled"``, or ``"mean"`` if asked).
- ``r >= fix_round`` (calibration): local training normalizes with the *frozen global pooled
  statistics* (BN in eval mode, ``train=False`` in the forward pass) while every parameter,
  BN scale and bias included, keeps learning; the server no longer changes the statistics
  (bitwise: the round-``fix_round`` statistics are kept, not re-pooled).

How this relates to the original bug (``fedprox_bn_eval``, ``bn_train=False``): eval-mode BN
*from round 0* normalizes with the initial statistics (mean 0, variance 1) that nothing ever
updates, so training runs on statistics of no data at all: that is the bug. Eval-mode BN with
good global statistics *after a warm-up* of ordinary BN training is FixBN: training then
normalizes exactly as the global model is evaluated, with statistics of the union of the
clients' data, so the local gradients are no longer biased by each client's own mini-batch
statistics and training and test normalization agree.

Local momentum (the paper complements FixBN by keeping the local SGD momentum instead of
resetting it every round): each client keeps its own client optimizer state across rounds, the
FedAvg family's ``persist_client_optimizer``. ``keep_momentum`` says when:

- ``"after_fix"`` (default): fresh client optimizer every round before ``fix_round``, so the
  exploration phase is plain FedAvg, the baseline FixBN is compared with; from ``fix_round`` on
  each client resumes its own optimizer state where its last round left it. Chosen so the
  first phase is exactly FedAvg and the momentum practice applies to the phase it was
  proposed with;
- ``"always"``: kept in every round (phase 1 is FedAvg with ``persist_client_optimizer``);
- ``"never"``: fresh every round (FixBN's statistics rule alone, as an ablation).

The two phases are two *stages* of the algorithm (``Algorithm.stages``): the executors pick the
stage by the round on the host and compile each stage's step once, so a local step is a plain
train step of one BN mode (a ``lax.cond`` between the modes in every step ran several times
slower on XLA:CPU, which runs convolutions inside control flow slowly: ``docs/design.md``).
The algorithm's own functions, for callers that drive them directly, choose the phase from the
server's round counter with that ``lax.cond`` and give the same results.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_bn import client as client_lib
from fedjax_bn.algorithms.base import Algorithm, FedState
from fedjax_bn.algorithms.fedavg import (
    Carry,
    ClientState,
    Message,
    ServerState,
    check_dp,
    make_algorithm,
    server_step,
)
from fedjax_bn.client import Batch, ClientMetrics
from fedjax_bn.privacy.dp_fedavg import DPServer, privatize

Array = jax.Array
KeepMomentum = Literal["after_fix", "always", "never"]
KEEP_MOMENTUM: tuple[str, ...] = ("after_fix", "always", "never")


class FixBNServer(NamedTuple):
    """Replicated: FedAvg's server state plus the number of rounds the server has aggregated."""

    shared: Any
    pooled: Any
    opt_state: Any
    round: Array  # int32; round r's clients see r, so phase 2 is round >= fix_round


class FixBNCarry(NamedTuple):
    """A client mid-round: FedAvg's carry and whether BN is frozen on the global statistics."""

    base: Carry
    fixed: Array  # bool scalar, from the server's round (unbatched under vmap)


def _select(flag: Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise ``where(flag, on_true, on_false)`` over two trees of one structure."""
    return jax.tree.map(lambda a, b: jnp.where(flag, a, b), on_true, on_false)


def fixbn(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    fix_round: int,
    keep_momentum: KeepMomentum = "after_fix",
    name: str = "fixbn",
    **kw: Any,
) -> Algorithm:
    """FixBN: FedAvg for rounds ``< fix_round``, then local BN on the frozen global statistics.

    ``fix_round`` counts rounds from 0 (``fix_round=0``: frozen on the starting statistics from
    the first round, i.e. the original bug with momentum kept). ``keep_momentum``: when clients
    keep their optimizer state across rounds (module docstring). Other keywords (``mu``,
    ``server_tx``, ``bn_stats``) are :func:`~fedjax_bn.algorithms.make_algorithm`'s; the BN
    policy is ``fedavg`` (FixBN needs global statistics) and the BN mode is FixBN's own.

    ``dp=fedjax_bn.privacy.gaussian(...)``: DP-FedAvg in every round. Before ``fix_round`` the
    BN statistics' change travels inside the clipped, noised update, as under ``fedavg``; from
    ``fix_round`` on its entries are zero for every client and the server keeps the statistics
    it had (noised, hence post-processing): nothing of BN statistics leaves a client after the
    freeze. The server state is then :class:`~fedjax_bn.privacy.DPServer`, whose count of
    noised updates (one per round) gives the phase.
    """
    if fix_round < 0:
        raise ValueError(f"fix_round must be >= 0, got {fix_round}.")
    if keep_momentum not in KEEP_MOMENTUM:
        raise ValueError(
            f"Unknown keep_momentum {keep_momentum!r}; valid: {', '.join(KEEP_MOMENTUM)}."
        )
    for owned in ("policy", "bn_train", "persist_client_optimizer"):
        if owned in kw:
            raise TypeError(f"fixbn sets {owned!r} itself; it cannot be passed.")
    dp = kw.pop("dp", None)
    check_dp(dp, clip_norm=kw.get("clip_norm"), normalize=kw.get("normalize"),
             aggregator=kw.get("aggregator"))  # fmt: skip
    persist = keep_momentum != "never"
    base = make_algorithm(
        model, client_tx, policy="fedavg", persist_client_optimizer=persist, name=name, **kw
    )

    def phase(fixed: bool | None) -> Algorithm:
        """The functions of one phase (``fixed`` static), or of both (None: from the round)."""
        if dp is None:
            return _fixbn_functions(base, fix_round, keep_momentum, fixed, _own_round)
        alg = _fixbn_functions(base, fix_round, keep_momentum, fixed, _dp_round)
        frozen = (lambda s: _dp_round(s) >= fix_round) if fixed is None else (lambda s: fixed)
        step = functools.partial(server_step, kw.get("server_tx"))
        how = kw.get("bn_stats") or "pooled"
        return privatize(alg, dp, server_step=step, how=how, frozen_stats=frozen)

    explore, calibrate = phase(False), phase(True)
    stages = ((0, calibrate),) if fix_round == 0 else ((0, explore), (fix_round, calibrate))
    return phase(None)._replace(stages=stages)


def _own_round(server: FixBNServer) -> Array:
    """The round counter of FixBN's own server state."""
    return server.round


def _dp_round(server: DPServer) -> Array:
    """DP-FedAvg's count of noised updates: one per round, empty rounds included."""
    return server.dp.round


def _fixbn_functions(
    base: Algorithm,
    fix_round: int,
    keep_momentum: KeepMomentum,
    fixed: bool | None,
    round_of: Callable[[Any], Array],
) -> Algorithm:
    """FixBN's functions around FedAvg's ``base``: for one phase when ``fixed`` is a bool (the
    stages the executors run), or choosing the phase from ``round_of(server)`` when None."""
    train_spec = base.local
    eval_spec = dataclasses.replace(train_spec, bn_train=False)

    def is_fixed(server: Any) -> Array | bool:
        return round_of(server) >= fix_round if fixed is None else fixed

    def init(rng_or_variables: Any, sample_x: Array, num_clients: int) -> FedState:
        state = base.init(rng_or_variables, sample_x, num_clients)
        server = FixBNServer(*state.server, jnp.zeros((), jnp.int32))
        return FedState(server, state.clients, state.round)

    def client_init(server: Any, client: ClientState) -> FixBNCarry:
        flag = is_fixed(server)
        base_server = ServerState(server.shared, server.pooled, server.opt_state)
        if keep_momentum == "after_fix" and flag is not True:
            fresh = base.client_init(base_server, client._replace(opt_state=None))
            opt = _select(flag, client.opt_state, fresh.local.opt_state)
            carry = fresh._replace(local=fresh.local._replace(opt_state=opt))
        else:
            carry = base.client_init(base_server, client)
        return FixBNCarry(carry, jnp.asarray(flag))

    def client_step(carry: FixBNCarry, batch: Batch) -> FixBNCarry:
        def step(spec: client_lib.LocalTraining) -> client_lib.LocalState:
            return client_lib.train_step(spec, carry.base.anchor, carry.base.local, batch)

        if fixed is None:
            local = jax.lax.cond(carry.fixed, lambda: step(eval_spec), lambda: step(train_spec))
        else:
            local = step(eval_spec if fixed else train_spec)
        return carry._replace(base=carry.base._replace(local=local))

    def client_final(carry: FixBNCarry) -> tuple[Message, ClientState, ClientMetrics]:
        return base.client_final(carry.base)

    def server_update(server: FixBNServer, messages: Message, weights_C: Array) -> FixBNServer:
        new = base.server_update(
            ServerState(server.shared, server.pooled, server.opt_state), messages, weights_C
        )
        pooled = _select(is_fixed(server), server.pooled, new.pooled)
        return FixBNServer(new.shared, pooled, new.opt_state, server.round + 1)

    return Algorithm(
        base.name,
        base.policy,
        base.model,
        init,
        client_init,
        client_step,
        client_final,
        server_update,
        train_spec,
    )
