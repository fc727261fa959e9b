"""Ditto (Li, Hu, Beirami, Smith, ICML 2021): a personal model per client next to FedAvg.

Each client runs the ordinary update of the global model (FedAvg's client side under the
chosen BN policy, what the server averages) and, on the same batches, trains its own personal
model ``v`` with the proximal term ``lambda/2 ||v - w||^2`` towards the round's global shared
parameters ``w`` (the shared parameters only: under ``fedbn`` the BN layers are not pulled).
The personal model is a whole variables tree (its own BN statistics included) that lives in
the client state, so it persists across rounds, and across rounds a client sits out.
``lam=0`` is local training alone; a large ``lam`` holds ``v`` at ``w``.

Evaluation (``fedjax_bn.evaluate``): ``evaluate_clients`` reports each client's personal model
(``personal=False``: its copy of the global model), ``evaluate_global`` the global one. A
client whose personal model never trained (``rounds == 0``) is evaluated with the global model
(its global leaves plus its own local leaves): the documented fallback for never-seen clients.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_bn import client as client_lib
from fedjax_bn.algorithms.base import Algorithm, FedState
from fedjax_bn.algorithms.fedavg import Carry, ClientState, make_algorithm
from fedjax_bn.client import Batch, ClientMetrics, LocalState
from fedjax_bn.hyper import inject
from fedjax_bn.policy import merge
from fedjax_bn.tree import Variables, repeat_clients, take_client

Array = jax.Array


class DittoClient(NamedTuple):
    """Per client: FedAvg's client state, the personal model, its optimizer state (None unless
    persisted) and how many rounds the personal model trained in."""

    local: Variables
    opt_state: Any
    personal: Variables
    personal_opt: Any
    rounds: Array  # int32


class DittoCarry(NamedTuple):
    """A client mid-round: FedAvg's carry, the personal model's training state, its anchor."""

    base: Carry
    personal: LocalState
    anchor: Variables  # the round's global shared leaves
    rounds: Array


def ditto(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    lam: float,
    personal_tx: optax.GradientTransformation | None = None,
    name: str = "ditto",
    **kw: Any,
) -> Algorithm:
    """Ditto with proximal weight ``lam`` (>= 0); ``personal_tx`` trains the personal model
    (default ``client_tx``). Other keywords (``policy``, ``mu``, ``server_tx``,
    ``persist_client_optimizer``, which also keeps the personal optimizer) are
    :func:`~fedjax_bn.algorithms.make_algorithm`'s."""
    if lam < 0:
        raise ValueError(f"Ditto lam must be >= 0, got {lam}.")
    if kw.get("compress") is not None:
        raise ValueError("compress is not available for ditto yet; use fedavg/fedprox/fedbn.")
    kw.setdefault("policy", "fedavg")
    persist = bool(kw.get("persist_client_optimizer", False))
    base = make_algorithm(model, client_tx, name=name, **kw)
    pspec = dataclasses.replace(base.local, tx=personal_tx or client_tx, mu=float(lam))

    def init(rng_or_variables: Any, sample_x: Array, num_clients: int) -> FedState:
        state = base.init(rng_or_variables, sample_x, num_clients)
        server, clients = state.server, state.clients
        start = merge(server.shared, server.pooled, take_client(clients.local, 0))
        opt = pspec.tx.init(start["params"]) if persist else None
        extra = repeat_clients((start, opt, jnp.zeros((), jnp.int32)), num_clients)
        return state._replace(clients=DittoClient(clients.local, clients.opt_state, *extra))

    def client_init(server: Any, client: DittoClient) -> DittoCarry:
        fedavg_client = ClientState(local=client.local, opt_state=client.opt_state)
        carry = base.client_init(server, fedavg_client)
        personal = client_lib.init_state(pspec, client.personal, client.personal_opt)
        hyper = getattr(server, "hyper", None) or {}
        if personal_tx is None and "client" in hyper:  # one client_tx: one swept lr for both
            personal = personal._replace(opt_state=inject(personal.opt_state, hyper["client"]))
        return DittoCarry(carry, personal, server.shared, client.rounds)

    def client_step(carry: DittoCarry, batch: Batch) -> DittoCarry:
        glob = base.client_step(carry.base, batch)
        personal = client_lib.train_step(pspec, carry.anchor, carry.personal, batch)
        return carry._replace(base=glob, personal=personal)

    def client_final(carry: DittoCarry) -> tuple[Any, DittoClient, ClientMetrics]:
        message, client, metrics = base.client_final(carry.base)
        p = carry.personal
        rounds = carry.rounds + (p.steps > 0).astype(jnp.int32)
        opt = p.opt_state if persist else None
        mine = DittoClient(client.local, client.opt_state, p.variables, opt, rounds)
        return message, mine, metrics

    return base._replace(
        init=init, client_init=client_init, client_step=client_step, client_final=client_final
    )
