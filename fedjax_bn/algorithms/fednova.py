"""FedNova (Wang et al., NeurIPS 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization"): FedAvg's client side, normalized averaging on the server.

With heterogeneous local work (stragglers, ``fedjax_bn.budgets``, or clients of different
sizes running different numbers of steps per epoch) FedAvg's average weights each client by
``p_c * tau_c`` in effect, so the clients doing more steps pull the model towards their own
optimum: the objective it converges to is not the one it was given. FedNova averages the
per-step updates ``d_c = (x - y_c) / tau_c`` instead and steps ``tau_eff = sum_c p_c tau_c``
of them: ``x - tau_eff * sum_c p_c d_c`` (``aggregate.normalized_mean``), ``p_c`` the clients'
normalized sizes. Equal steps are FedAvg exactly (up to float rounding).

Each client's ``tau_c`` is its ``LocalState.steps`` (optimizer steps that saw a real example),
sent in ``Message.steps``. Only the shared float parameters are normalized: BN running
statistics are pooled as FedAvg pools them, integer leaves keep their value. ``server_tx``
composes: it steps the pseudo-gradient ``tau_eff * sum_c p_c d_c``.

This is the paper's vanilla-SGD normalization (``||a_c||_1 = tau_c``). With momentum or Adam
clients the paper's ``a_c`` would differ (for SGD momentum ``rho`` it is
``(tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho)``); normalizing by the step count there is
a heuristic generalization, not the paper's exact method.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import optax

from fedjax_bn.algorithms.base import Algorithm
from fedjax_bn.algorithms.fedavg import make_algorithm


def fednova(model: nn.Module, client_tx: optax.GradientTransformation, **kw: Any) -> Algorithm:
    """FedNova: FedAvg (any BN policy, default ``fedavg``) with normalized averaging."""
    kw.setdefault("policy", "fedavg")
    return make_algorithm(
        model, client_tx, normalize="fednova", name=kw.pop("name", "fednova"), **kw
    )
