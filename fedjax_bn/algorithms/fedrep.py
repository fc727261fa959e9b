"""FedRep (Collins et al., ICML 2021) and the leaf-split personalization baselines FedPer
(Arivazhagan et al. 2019) and LG-FedAvg (Liang et al. 2020), on any BN policy.

FedPer keeps the head (the named modules) per client and averages the rest; LG-FedAvg keeps
the body (everything but the head) and averages the head. Both are FedAvg with ``local=``
(``policy.py``); under ``fedbn`` the BN layers stay local too.

FedRep keeps the head local as FedPer does, and trains in two phases each round: the client's
first ``head_steps`` local steps train the head with the body frozen, the remaining steps the
body with the head frozen; only the body (the shared leaves) is averaged. A frozen parameter
gets a zero gradient and a zero update, and the frozen part's BN running statistics are kept
(``client.train_step``'s ``frozen``). The phase is read from the client's own count of real
steps, so it needs no control flow and no round number. ``head_steps`` counts steps, not
epochs, because the executors own the epoch loop and a client's steps per epoch depend on its
size: the paper's "10 head epochs, then 1 body epoch" is ``local_epochs=11`` with
``head_steps`` set to ten epochs' steps of a typical client. With ``head_steps`` at least the
round's steps the body never trains (FedPer's head with a frozen body).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import optax

from fedjax_bn import client as client_lib
from fedjax_bn.algorithms.base import Algorithm
from fedjax_bn.algorithms.fedavg import Carry, make_algorithm
from fedjax_bn.client import Batch
from fedjax_bn.policy import AllBut, local_mask


def fedper(
    model: nn.Module, client_tx: optax.GradientTransformation, *, head: Sequence[str], **kw: Any
) -> Algorithm:
    """FedPer: the ``head`` modules (module-path component names) stay with each client."""
    kw.setdefault("policy", "fedavg")
    return make_algorithm(model, client_tx, local=tuple(head), name=kw.pop("name", "fedper"), **kw)


def lg_fedavg(
    model: nn.Module, client_tx: optax.GradientTransformation, *, head: Sequence[str], **kw: Any
) -> Algorithm:
    """LG-FedAvg: every module but the ``head`` stays with each client; the head is averaged."""
    kw.setdefault("policy", "fedavg")
    local = AllBut(tuple(head))
    return make_algorithm(model, client_tx, local=local, name=kw.pop("name", "lg_fedavg"), **kw)


def fedrep(
    model: nn.Module,
    client_tx: optax.GradientTransformation,
    *,
    head: Sequence[str],
    head_steps: int,
    name: str = "fedrep",
    **kw: Any,
) -> Algorithm:
    """FedRep: local ``head``, trained alone for a round's first ``head_steps`` steps, then the
    body alone; only the body is averaged. Other keywords (``policy``, ``mu``, ``server_tx``,
    ...) are :func:`~fedjax_bn.algorithms.make_algorithm`'s."""
    if head_steps < 0:
        raise ValueError(f"head_steps must be >= 0, got {head_steps}.")
    if "local" in kw:
        raise TypeError("fedrep sets 'local' itself (the head); pass head= instead.")
    kw.setdefault("policy", "fedavg")
    head = tuple(head)
    base = make_algorithm(model, client_tx, local=head, name=name, **kw)
    spec = base.local

    def client_step(carry: Carry, batch: Batch) -> Carry:
        state = carry.local
        in_head = state.steps < head_steps
        is_head = local_mask(state.variables, head)  # static: which leaves are the head
        frozen = {p: jnp.logical_not(in_head) if h else in_head for p, h in is_head.items()}
        local = client_lib.train_step(spec, carry.anchor, state, batch, frozen=frozen, mu=carry.mu)
        return carry._replace(local=local)

    return base._replace(client_step=client_step)
