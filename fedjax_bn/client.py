"""One client's local training step, as pure functions.

Local training always states BatchNorm's mode: ``train=True`` with ``mutable=['batch_stats']``
(the fix for the original FedProx bug), or, only when asked for by ``bn_train=False``, the bug
itself on purpose: BN frozen on its running statistics. The FedProx term
``mu/2 * ||w - w_global||^2`` runs over the shared parameters only (the ``anchor``). A
``correction`` tree (SCAFFOLD's ``c - c_i``) is added to the gradient of the shared parameters
before the client optimizer sees it, so it works with any optax optimizer.

Algorithms (``fedjax_bn.algorithms``) build their client side from :func:`train_step`; how many
steps run and on which batches is the executors' business (``fedjax_bn.execution``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_bn.tree import Variables, flatten, unflatten

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """What a client does locally: model, optimizer, FedProx ``mu``, BN mode while training."""

    model: nn.Module
    tx: optax.GradientTransformation
    mu: float = 0.0
    bn_train: bool = True


class Batch(NamedTuple):
    """One batch of a client's examples; ``mask=None`` means every example is real."""

    x: Array
    y: Array
    mask: Array | None = None


class LocalState(NamedTuple):
    """A client mid-round: its variables, optimizer state and running metric sums."""

    variables: Variables
    opt_state: Any
    loss_sum: Array
    correct: Array
    count: Array
    steps: Array  # optimizer steps that saw at least one real example


class ClientResult(NamedTuple):
    """A client's plain local round (``execution.client_update``): variables, optimizer state
    and round metrics."""

    variables: Variables
    opt_state: Any
    loss: Array
    accuracy: Array
    num_seen: Array


class ClientMetrics(NamedTuple):
    """A client's training metrics of one round (stacked by executors: each ``[C]``)."""

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
    anchor: Variables | None,
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
    if spec.mu and anchor is not None:
        loss = loss + spec.mu * prox_term({"params": params}, anchor)
    return loss, (rest, ce_sum, correct)


def init_state(spec: LocalTraining, variables: Variables, opt_state: Any = None) -> LocalState:
    """A client at the start of a round; a fresh optimizer unless ``opt_state`` is carried over."""
    if opt_state is None:
        opt_state = spec.tx.init(variables["params"])
    zero = jnp.zeros((), jnp.float32)
    return LocalState(variables, opt_state, zero, zero, zero, jnp.zeros((), jnp.int32))


def add_correction(grads: Variables, correction: Variables) -> Variables:
    """``grads`` (a params tree) plus ``correction`` (a ``{'params': ...}`` subtree) where given."""
    flat = flatten({"params": grads})
    for path, c in flatten(correction).items():
        flat[path] = flat[path] + c.astype(flat[path].dtype)
    return unflatten(flat)["params"]


def train_step(
    spec: LocalTraining,
    anchor: Variables | None,
    state: LocalState,
    x_B: Array,
    y_B: Array,
    mask_B: Array | None,
    correction: Variables | None = None,
) -> LocalState:
    """One optimizer step on a partially masked batch; a fully masked batch is a no-op.

    ``mask_B=None`` is a full batch (every example real): no masking and no no-op select, the
    cost of a plain train step. ``anchor``: the shared parameters FedProx pulls towards (None
    without a proximal term); ``correction``: added to the shared parameters' gradient.
    """
    params = state.variables["params"]
    rest = {k: v for k, v in state.variables.items() if k != "params"}
    grads, (rest, ce_sum, correct) = jax.grad(
        lambda p: loss_fn(spec, p, rest, anchor, x_B, y_B, mask_B), has_aux=True
    )(params)
    if correction:
        grads = add_correction(grads, correction)
    updates, opt_state = spec.tx.update(grads, state.opt_state, params)
    stepped = LocalState(
        {"params": optax.apply_updates(params, updates), **rest},
        opt_state,
        state.loss_sum + ce_sum,
        state.correct + correct,
        state.count + num_real(y_B, mask_B),
        state.steps + 1,
    )
    if mask_B is None:
        return stepped
    valid = jnp.any(mask_B)
    return jax.tree.map(lambda new, old: jnp.where(valid, new, old), stepped, state)


def metrics(state: LocalState) -> ClientMetrics:
    """Round metrics from a client's final state (mean loss and accuracy over seen examples)."""
    seen = jnp.maximum(state.count, 1.0)
    return ClientMetrics(state.loss_sum / seen, state.correct / seen, state.count)
