"""One client's local update, as pure functions.

Local training always states BatchNorm's mode: ``train=True`` with ``mutable=['batch_stats']``
(the fix for the original FedProx bug), or, only when asked for by ``bn_train=False``, the bug
itself on purpose: BN frozen on its running statistics. The FedProx term
``mu/2 * ||w - w_global||^2`` runs over the shared parameters only (the ``anchor``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_bn.data.federated import gather_batch
from fedjax_bn.tree import Variables, flatten

Array = jax.Array
LocalLoop = Literal["scan", "unroll"]


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """What a client does locally: model, optimizer, FedProx ``mu``, BN mode while training."""

    model: nn.Module
    tx: optax.GradientTransformation
    mu: float = 0.0
    bn_train: bool = True


class ClientState(NamedTuple):
    """A client mid-round: its variables, optimizer state and running metric sums."""

    variables: Variables
    opt_state: Any
    loss_sum: Array
    correct: Array
    count: Array


class ClientResult(NamedTuple):
    """What a client sends back: new variables, optimizer state and round metrics."""

    variables: Variables
    opt_state: Any
    loss: Array
    accuracy: Array
    num_seen: Array


def prox_term(params: Variables, anchor: Variables) -> Array:
    """``0.5 * ||w - w_anchor||^2`` over the params paths present in ``anchor`` only."""
    flat_w, flat_a = flatten(params), flatten(anchor)
    sq = [jnp.sum(jnp.square(flat_w[p].astype(jnp.float32) - a)) for p, a in flat_a.items()]
    return 0.5 * sum(sq, start=jnp.zeros((), jnp.float32))


def masked_cross_entropy(logits_BK: Array, y_B: Array, mask_B: Array | None) -> tuple[Array, Array]:
    """(sum of cross-entropy, number correct) over the real (unmasked) examples.

    ``mask_B=None``: every example is real (a full batch).
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits_BK.astype(jnp.float32), y_B)
    correct = jnp.argmax(logits_BK, -1) == y_B
    if mask_B is None:
        return jnp.sum(ce), jnp.sum(correct)
    return jnp.sum(jnp.where(mask_B, ce, 0.0)), jnp.sum(correct & mask_B)


def num_real(y_B: Array, mask_B: Array | None) -> Array:
    """How many examples of the batch are real: ``sum(mask_B)``, or B for a full batch."""
    return jnp.asarray(y_B.shape[0], jnp.int32) if mask_B is None else jnp.sum(mask_B)


def loss_fn(
    spec: LocalTraining,
    params: Variables,
    rest: Variables,
    anchor: Variables,
    x_B: Array,
    y_B: Array,
    mask_B: Array | None,
) -> tuple[Array, tuple[Variables, Array, Array]]:
    """Mean loss (+ FedProx term) and the new non-param collections, in the requested BN mode.

    ``mask_B=None`` is a full batch: BN skips its (measurably slower) masked statistics.
    """
    variables = {"params": params, **rest}
    if spec.bn_train:
        logits, updates = spec.model.apply(
            variables, x_B, train=True, mask=mask_B, mutable=["batch_stats"]
        )
        rest = {**rest, **updates}
    else:  # the original bug, reproduced on purpose: BN stays on frozen running statistics
        logits = spec.model.apply(variables, x_B, train=False, mask=mask_B)
    ce_sum, correct = masked_cross_entropy(logits, y_B, mask_B)
    loss = ce_sum / jnp.maximum(num_real(y_B, mask_B), 1)
    if spec.mu:
        loss = loss + spec.mu * prox_term({"params": params}, anchor)
    return loss, (rest, ce_sum, correct)


def init_state(spec: LocalTraining, variables: Variables, opt_state: Any = None) -> ClientState:
    """A client at the start of a round; a fresh optimizer unless ``opt_state`` is carried over."""
    if opt_state is None:
        opt_state = spec.tx.init(variables["params"])
    zero = jnp.zeros((), jnp.float32)
    return ClientState(variables, opt_state, zero, zero, zero)


def train_step(
    spec: LocalTraining,
    anchor: Variables,
    state: ClientState,
    x_B: Array,
    y_B: Array,
    mask_B: Array | None,
) -> ClientState:
    """One optimizer step on a partially masked batch; a fully masked batch is a no-op.

    ``mask_B=None`` is a full batch (every example real): no masking and no no-op select, the
    cost of a plain train step.
    """
    params = state.variables["params"]
    rest = {k: v for k, v in state.variables.items() if k != "params"}
    grads, (rest, ce_sum, correct) = jax.grad(
        lambda p: loss_fn(spec, p, rest, anchor, x_B, y_B, mask_B), has_aux=True
    )(params)
    updates, opt_state = spec.tx.update(grads, state.opt_state, params)
    stepped = ClientState(
        {"params": optax.apply_updates(params, updates), **rest},
        opt_state,
        state.loss_sum + ce_sum,
        state.correct + correct,
        state.count + num_real(y_B, mask_B),
    )
    if mask_B is None:
        return stepped
    valid = jnp.any(mask_B)
    return jax.tree.map(lambda new, old: jnp.where(valid, new, old), stepped, state)


def run_local(
    spec: LocalTraining,
    anchor: Variables,
    state: ClientState,
    x_N: Array,
    y_N: Array,
    idx_SB: Array,
    mask_SB: Array,
    *,
    loop: LocalLoop = "scan",
) -> ClientState:
    """All of a round's local steps. ``scan`` suits GPU/TPU; ``unroll`` avoids the XLA:CPU trap
    where convolution gradients inside a while loop run ~13x slower (DESIGN.md)."""

    def step(state: ClientState, batch: tuple[Array, Array]) -> ClientState:
        idx_B, mask_B = batch
        return train_step(spec, anchor, state, *gather_batch(x_N, y_N, idx_B), mask_B)

    if loop == "scan":
        return jax.lax.scan(lambda s, b: (step(s, b), None), state, (idx_SB, mask_SB))[0]
    if loop == "unroll":
        for s in range(idx_SB.shape[0]):
            state = step(state, (idx_SB[s], mask_SB[s]))
        return state
    raise ValueError(f"Unknown local loop {loop!r}; use 'scan' or 'unroll'.")


def finish(state: ClientState) -> ClientResult:
    """Round metrics from a client's final state."""
    seen = jnp.maximum(state.count, 1.0)
    return ClientResult(
        state.variables, state.opt_state, state.loss_sum / seen, state.correct / seen, state.count
    )


def client_update(
    spec: LocalTraining,
    variables: Variables,
    anchor: Variables,
    x_N: Array,
    y_N: Array,
    idx_SB: Array,
    mask_SB: Array,
    opt_state: Any = None,
    *,
    loop: LocalLoop = "scan",
) -> ClientResult:
    """A client's whole local round: start from ``variables``, train, report."""
    state = init_state(spec, variables, opt_state)
    return finish(run_local(spec, anchor, state, x_N, y_N, idx_SB, mask_SB, loop=loop))
