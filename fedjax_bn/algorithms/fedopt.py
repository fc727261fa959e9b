"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"): FedAvgM, FedAdam,
FedYogi, FedAdagrad, each FedAvg's client side with an optax ``server_tx`` on the server.

The server optimizer steps the pseudo-gradient ``global - weighted mean`` of the shared float
parameters only (``fedavg.server_step``); pooled BN statistics are pooled, never stepped, and
integer leaves never. Every factory takes any BN policy: ``fedadam(model, tx, policy="fedbn")``.
The defaults are the paper's: ``beta1=0.9``, ``beta2=0.99``, adaptivity ``tau=1e-3``; the
server learning rate is tuned per task there (its grid is ``10^-3 .. 10^1``); the defaults here
(1.0 for FedAvgM, 1e-2 for the adaptive ones) are starting points, not tuned values. optax's
Adam and Yogi apply bias correction, which the paper's pseudo-code does not.

The server learning rate, FedAvgM's momentum and FedAdam's ``tau`` are data in the server
optimizer's state (``optax.inject_hyperparams``; set them with ``fb.with_hyperparams(state,
{"server.learning_rate": ...})``, no program compiles again). The betas stay constants: optax
forms ``1 - b1`` from them, in float64 from a constant but in float32 from data, which would
change the results' last bits (``fedjax_bn/hyper.py``); FedYogi's and FedAdagrad's ``tau`` also
sets the accumulator's starting value, so it stays a constant of the build.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import optax

from fedjax_bn.algorithms.base import Algorithm
from fedjax_bn.algorithms.fedavg import make_algorithm

TAU = 1e-3  # the paper's adaptivity (its epsilon)
BETA1, BETA2 = 0.9, 0.99


def _server_alg(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    server_tx: optax.GradientTransformation,
    name: str,
    kw: dict[str, Any],
) -> Algorithm:
    kw.setdefault("policy", "fedavg")
    return make_algorithm(model, client_tx, server_tx=server_tx, name=kw.pop("name", name), **kw)


def fedavgm(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    server_lr: float = 1.0,
    momentum: float = 0.9,
    **kw: Any,
) -> Algorithm:
    """FedAvgM (Hsu et al. 2019): server SGD with momentum 0.9, server lr 1 on the
    pseudo-gradient. ``momentum=0`` and ``server_lr=1`` is FedAvg."""
    tx = optax.inject_hyperparams(optax.sgd)(server_lr, momentum=momentum or None)
    return _server_alg(model, client_tx, tx, "fedavgm", kw)


def fedadam(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    server_lr: float = 1e-2,
    b1: float = BETA1,
    b2: float = BETA2,
    tau: float = TAU,
    **kw: Any,
) -> Algorithm:
    """FedAdam: server Adam, ``beta1=0.9, beta2=0.99``, adaptivity ``tau=1e-3`` (its eps)."""
    adam = optax.inject_hyperparams(optax.adam, static_args=("b1", "b2", "eps_root"))
    tx = adam(server_lr, b1=b1, b2=b2, eps=tau)
    return _server_alg(model, client_tx, tx, "fedadam", kw)


def fedyogi(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    server_lr: float = 1e-2,
    b1: float = BETA1,
    b2: float = BETA2,
    tau: float = TAU,
    **kw: Any,
) -> Algorithm:
    """FedYogi: server Yogi, ``beta1=0.9, beta2=0.99``, ``tau=1e-3``, second moment started
    at ``tau**2`` (the paper's ``v_{-1}``)."""

    # optax.yogi takes no initial_accumulator_value: the same chain as optax.yogi, with it.
    def yogi(learning_rate: float) -> optax.GradientTransformation:
        return optax.chain(
            optax.scale_by_yogi(b1=b1, b2=b2, eps=tau, initial_accumulator_value=tau**2),
            optax.scale_by_learning_rate(learning_rate),
        )

    tx = optax.inject_hyperparams(yogi)(server_lr)
    return _server_alg(model, client_tx, tx, "fedyogi", kw)


def fedadagrad(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    server_lr: float = 1e-2,
    tau: float = TAU,
    **kw: Any,
) -> Algorithm:
    """FedAdagrad: server Adagrad, accumulator started at ``tau**2`` (``tau=1e-3``).

    optax's Adagrad has no first-moment momentum and adds its eps inside the square root;
    ``eps=tau**2`` keeps the step bounded as the paper's ``+tau`` does.
    """
    adagrad = optax.inject_hyperparams(
        optax.adagrad, static_args=("initial_accumulator_value", "eps")
    )
    tx = adagrad(server_lr, initial_accumulator_value=tau**2, eps=tau**2)
    return _server_alg(model, client_tx, tx, "fedadagrad", kw)
