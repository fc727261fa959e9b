"""FedAvg with BatchNorm on batch statistics only (PyTorch's ``track_running_stats=False``).

Clients train as FedAvg does but send no BN statistics and the server keeps none, so its
global statistics are meaningful only after ``fedjax_bn.recalibrate.recalibrate_bn``.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from fedjax_bn.algorithms.base import Algorithm
from fedjax_bn.algorithms.fedavg import ClientState, Message, ServerState, make_algorithm
from fedjax_bn.client import ClientMetrics

Array = jax.Array


def fedavg_batch_stats_only(
    model: Any, client_tx: optax.GradientTransformation, **kw: Any
) -> Algorithm:
    """FedAvg with BN on batch statistics only (``track_running_stats=False`` style).

    Clients train in train mode as FedAvg does, but send no BN statistics and the server keeps
    none: ``pooled`` stays at the model's initial statistics, meaningful only after
    :func:`recalibrate_bn`. Its parameters train exactly as FedAvg's (the running statistics
    never enter a train-mode forward pass). Keywords: ``make_algorithm``'s, except ``policy``
    and ``bn_train``, which this factory sets.
    """
    for owned in ("policy", "bn_train"):
        if owned in kw:
            raise TypeError(f"fedavg_batch_stats_only sets {owned!r} itself; it cannot be passed.")
    name = kw.pop("name", "fedavg_batch_stats_only")
    if kw.get("dp") is not None:
        raise ValueError(
            "DP is not available for fedavg_batch_stats_only; use dp= with fedavg, fedbn or silobn."
        )
    base = make_algorithm(model, client_tx, policy="fedavg", name=name, **kw)

    def client_final(carry: Any) -> tuple[Message, ClientState, ClientMetrics]:
        message, client, metrics = base.client_final(carry)
        return message._replace(pooled={}), client, metrics

    def server_update(server: ServerState, messages: Message, weights_C: Array) -> ServerState:
        new = base.server_update(server._replace(pooled={}), messages, weights_C)
        return new._replace(pooled=server.pooled)

    return base._replace(client_final=client_final, server_update=server_update)
