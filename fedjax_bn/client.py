"""One client's local training step, as pure functions.

Local training always states BatchNorm's mode through the task (``fedjax_bn.task``):
``train=True`` with ``mutable=['batch_stats']`` (the fix for the original FedProx bug), or, only
when asked for by ``bn_train=False``, the bug itself on purpose: BN frozen on its running
statistics (for a model with one mode flag, dropout is off then too). The loss and metrics are
the task's per-example functions, summed over the batch's real examples; the step's key feeds
dropout and augmentation. The FedProx term
``mu/2 * ||w - w_global||^2`` runs over the shared parameters only (the ``anchor``). A
``correction`` tree (SCAFFOLD's ``c - c_i``) is added to the gradient of the shared parameters
before the client optimizer sees it, so it works with any optax optimizer.

Algorithms (``fedjax_bn.algorithms``) build their client side from :func:`train_step`; how many
steps run and on which batches is the executors' business (``fedjax_bn.execution``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_bn.task import Task, as_task, batch_size_of
from fedjax_bn.tree import Variables, flatten, unflatten

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """What a client does locally: the task (model, loss, metrics, augmentation), optimizer,
    FedProx ``mu``, BN mode while training. ``model`` may be a :class:`~fedjax_bn.task.Task`
    or a bare Linen/NNX model (the default task)."""

    model: Any
    tx: optax.GradientTransformation
    mu: float = 0.0
    bn_train: bool = True

    @property
    def task(self) -> Task:
        """The task every call of local training goes through."""
        return as_task(self.model)


class Batch(NamedTuple):
    """One batch of a client's examples; ``mask=None`` means every example is real; ``key``
    (the step's PRNG key) feeds dropout and augmentation."""

    x: Any
    y: Any
    mask: Array | None = None
    key: Array | None = None


class LocalState(NamedTuple):
    """A client mid-round: its variables, optimizer state and running metric sums."""

    variables: Variables
    opt_state: Any
    loss_sum: Array
    metric_sums: dict[str, Array]
    count: Array
    steps: Array  # optimizer steps that saw at least one real example


class ClientMetrics(NamedTuple):
    """A client's training metrics of one round (stacked by executors: each ``[C]``): mean
    loss, every task metric's mean (``metrics[name]``), examples seen."""

    loss: Array
    metrics: dict[str, Array]
    num_seen: Array

    @property
    def accuracy(self) -> Array:
        """The ``accuracy`` metric (NaN where the task has none)."""
        return accuracy_of(self)


def accuracy_of(result: Any) -> Array:
    """``result.metrics["accuracy"]``, or NaN shaped like ``result.loss`` where the task has no
    accuracy (every per-client result type's ``accuracy``)."""
    return result.metrics.get("accuracy", jnp.full_like(result.loss, jnp.nan))


class ClientResult(NamedTuple):
    """A client's plain local round (``execution.client_update``): variables, optimizer state
    and round metrics."""

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


def masked_sum(values_B: Array, mask_B: Array | None) -> Array:
    """The sum of per-example values over the real (unmasked) examples, in float32 for
    metrics (booleans count as 0/1)."""
    if values_B.dtype == jnp.bool_:
        values_B = values_B.astype(jnp.float32)
    if mask_B is None:
        return jnp.sum(values_B)
    return jnp.sum(jnp.where(mask_B, values_B, 0.0))


def batch_sums(task: Task, outputs: Any, y: Any, mask_B: Array | None):
    """(sum of the loss, ``{name: sum of the metric}``) over the batch's real examples."""
    loss_B, metrics_B = task.per_example(outputs, y)
    return masked_sum(loss_B, mask_B), {k: masked_sum(v, mask_B) for k, v in metrics_B.items()}


def num_real(x: Any, mask_B: Array | None) -> Array:
    """How many examples of the batch are real: ``sum(mask_B)``, or B for a full batch."""
    if mask_B is None:
        return jnp.asarray(batch_size_of(x), jnp.int32)
    return jnp.sum(mask_B)


def step_keys(key: Array | None) -> tuple[Array | None, Array | None]:
    """A step's (model key: dropout and other RNG streams, augmentation key)."""
    if key is None:
        return None, None
    return jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)


def loss_fn(
    spec: LocalTraining,
    params: Variables,
    rest: Variables,
    anchor: Variables | None,
    batch: Batch,
    mu: Array | None = None,
) -> tuple[Array, tuple[Variables, Array, dict[str, Array]]]:
    """Mean loss (+ FedProx term) and the new non-param collections, in the requested BN mode.

    ``batch.mask=None`` is a full batch: BN skips its (measurably slower) masked statistics.
    ``mu``: FedProx's weight as data (None: ``spec.mu``); the term exists only if ``spec.mu``.
    """
    task = spec.task
    model_key, augment_key = step_keys(batch.key)
    x = batch.x
    if task.augment is not None:
        if augment_key is None:
            raise ValueError("augment needs a PRNG key per step: pass Batch(..., key=).")
        x = task.augmented(augment_key, x)
    variables = {"params": params, **rest}
    # bn_train=False is the original bug, reproduced on purpose: BN on frozen running stats.
    outputs, updates = task.apply(variables, x, train=spec.bn_train, mask=batch.mask, rng=model_key)
    rest = {**rest, **updates}
    loss_sum, metric_sums = batch_sums(task, outputs, batch.y, batch.mask)
    loss = loss_sum / jnp.maximum(num_real(batch.y, batch.mask), 1)
    if spec.mu and anchor is not None:
        loss = loss + (spec.mu if mu is None else mu) * prox_term({"params": params}, anchor)
    return loss, (rest, loss_sum, metric_sums)


def init_state(spec: LocalTraining, variables: Variables, opt_state: Any = None) -> LocalState:
    """A client at the start of a round; a fresh optimizer unless ``opt_state`` is carried over."""
    if opt_state is None:
        opt_state = spec.tx.init(variables["params"])
    zero = jnp.zeros((), jnp.float32)
    sums = {name: zero for name in spec.task.metrics}
    return LocalState(variables, opt_state, zero, sums, zero, jnp.zeros((), jnp.int32))


def add_correction(grads: Variables, correction: Variables) -> Variables:
    """``grads`` (a params tree) plus ``correction`` (a ``{'params': ...}`` subtree) where given."""
    flat = flatten({"params": grads})
    for path, c in flatten(correction).items():
        flat[path] = flat[path] + c.astype(flat[path].dtype)
    return unflatten(flat)["params"]


def freeze(frozen: dict[Any, Array], new: Variables, old: Variables, zero: bool) -> Variables:
    """``new`` with the leaves at ``frozen``'s paths (bool scalars, True: frozen) replaced by
    zeros (``zero``: gradients, updates) or by ``old``'s values (kept variables)."""
    flat_new, flat_old = flatten(new), flatten(old)
    out = dict(flat_new)
    for path, is_frozen in frozen.items():
        if path in flat_new:
            keep = jnp.zeros_like(flat_new[path]) if zero else flat_old[path]
            out[path] = jnp.where(is_frozen, keep, flat_new[path])
    return unflatten(out)


def train_step(
    spec: LocalTraining,
    anchor: Variables | None,
    state: LocalState,
    batch: Batch,
    correction: Variables | None = None,
    frozen: dict[Any, Array] | None = None,
    mu: Array | None = None,
) -> LocalState:
    """One optimizer step on a partially masked batch; a fully masked batch is a no-op.

    ``batch.mask=None`` is a full batch (every example real): no masking and no no-op select,
    the cost of a plain train step. ``anchor``: the shared parameters FedProx pulls towards
    (None without a proximal term); ``correction``: added to the shared parameters' gradient.
    ``frozen``: ``{variables path: bool scalar}`` (FedRep's phases); a frozen ``params`` leaf
    gets a zero gradient and a zero update, a frozen leaf of another collection (BN running
    statistics) keeps its value. ``mu``: FedProx's weight as data (None: ``spec.mu``).
    """
    params = state.variables["params"]
    rest = {k: v for k, v in state.variables.items() if k != "params"}
    grads, (new_rest, loss_sum, metric_sums) = jax.grad(
        lambda p: loss_fn(spec, p, rest, anchor, batch, mu), has_aux=True
    )(params)
    if correction:
        grads = add_correction(grads, correction)
    if frozen:
        grads = freeze(frozen, {"params": grads}, {}, zero=True)["params"]
    updates, opt_state = spec.tx.update(grads, state.opt_state, params)
    if frozen:
        updates = freeze(frozen, {"params": updates}, {}, zero=True)["params"]
        new_rest = freeze(frozen, new_rest, rest, zero=False)
    rest = new_rest
    stepped = LocalState(
        {"params": optax.apply_updates(params, updates), **rest},
        opt_state,
        state.loss_sum + loss_sum,
        {k: state.metric_sums[k] + v for k, v in metric_sums.items()},
        state.count + num_real(batch.y, batch.mask),
        state.steps + 1,
    )
    if batch.mask is None:
        return stepped
    valid = jnp.any(batch.mask)
    return jax.tree.map(lambda new, old: jnp.where(valid, new, old), stepped, state)


def metrics(state: LocalState) -> ClientMetrics:
    """Round metrics from a client's final state (mean loss and metrics over seen examples)."""
    seen = jnp.maximum(state.count, 1.0)
    means = {k: v / seen for k, v in state.metric_sums.items()}
    return ClientMetrics(state.loss_sum / seen, means, state.count)
