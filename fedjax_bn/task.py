"""The user's task: model (Linen as written, or Flax NNX), per-example loss and metrics, and an
on-device augmentation; the library owns BN's mode, padding masks and PRNG keys.

A :class:`Task` is what every part of the library calls a model through (local training,
evaluation, recalibration, AdaBN, monitoring, deployment). It guarantees, whatever the model's
own defaults:

- **BN's mode is stated at every call**: a Linen model gets its mode parameter (``train``, or
  the name given as ``train_kw``) by keyword on every ``init`` and ``apply``; an NNX model gets
  every BatchNorm's ``use_running_average`` and every Dropout's ``deterministic`` set on a
  fresh copy before every call, whatever mode the user left the module in.
- **Padding never reaches BatchNorm**: a batch's mask is handed to every BatchNorm call that
  does not already receive one (``flax.linen.intercept_methods`` for Linen, a masked subclass
  on the per-call copy for NNX), broadcast to the activation's rank. Models that take ``mask``
  themselves get it and are not masked twice. The loss and metrics are masked by the library.
- **Randomness per step**: a key given to :meth:`Task.apply` feeds Linen's ``dropout`` stream
  or reseeds every NNX RNG stream; training steps derive it from the round key, the client's
  population id and the step number (``fedjax_bn.execution.loop.step_key``).

Variables are a dict of collections (``params``, ``batch_stats``), for NNX models too
(``nnx.Param`` -> ``params``, ``nnx.BatchStat`` -> ``batch_stats``; integer path keys become
strings), so the policy module, aggregation and checkpoints see one layout.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_bn.masks import broadcast_mask
from fedjax_bn.tree import Variables

Array = jax.Array
PerExample = Callable[[Any, Any], Array]  # (outputs, y) -> values [B]
Augment = Callable[[Array, Any], Any]  # (key, x_B) -> x_B, same shapes and dtypes


def is_nnx(model: Any) -> bool:
    """Whether ``model`` is a Flax NNX module (without importing flax.nnx: a user holding one
    has imported it already)."""
    nnx = sys.modules.get("flax.nnx")
    return nnx is not None and isinstance(model, nnx.Module)


def softmax_cross_entropy(logits_BK: Array, y_B: Array) -> Array:
    """The default loss: softmax cross-entropy on integer class ids, per example, in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BK.astype(jnp.float32), y_B)


def accuracy(logits_BK: Array, y_B: Array) -> Array:
    """The default metric: 1 where the arg-max class is the label, per example."""
    return jnp.argmax(logits_BK, -1) == y_B


DEFAULT_METRICS: Mapping[str, PerExample] = {"accuracy": accuracy}


def _mask_linen_batch_norm(mask_B: Array):
    """Context: every ``nn.BatchNorm`` call without a ``mask`` gets ``mask_B``."""

    def interceptor(next_fun, args, kwargs, context):
        if (
            isinstance(context.module, nn.BatchNorm)
            and context.method_name == "__call__"
            and kwargs.get("mask") is None
        ):
            x = args[0] if args else kwargs["x"]
            kwargs = {**kwargs, "mask": broadcast_mask(mask_B, x, "/".join(context.module.path))}
        return next_fun(*args, **kwargs)

    return nn.intercept_methods(interceptor)


def _call_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(type(model).__call__).parameters


@dataclasses.dataclass(frozen=True)
class LinenModel:
    """A Linen module as written: its mode parameter is passed by keyword at every call."""

    module: nn.Module
    train_kw: str = "train"

    def __post_init__(self) -> None:
        params = _call_parameters(self.module)
        if self.train_kw not in params:
            raise TypeError(
                f"{type(self.module).__name__}.__call__ has no parameter {self.train_kw!r} "
                f"(it has {', '.join(p for p in params if p != 'self')}); the library states "
                "BatchNorm's mode by keyword at every call: give the model a `train` "
                "parameter, or name its mode parameter with train_kw= (e.g. "
                "train_kw='is_training')."
            )
        if params[self.train_kw].kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(
                f"{type(self.module).__name__}.__call__'s {self.train_kw!r} is positional-only; "
                "the library passes it by keyword."
            )

    @property
    def takes_mask(self) -> bool:
        """Whether the model routes ``mask`` to its BatchNorm layers itself."""
        return "mask" in _call_parameters(self.module)

    def init(self, rng: Array, x: Any) -> Variables:
        """Fresh variables, traced in eval mode (no batch statistics are computed)."""
        return dict(self.module.init(rng, x, **{self.train_kw: False}))

    def apply(
        self, variables: Variables, x: Any, *, train: bool, mask: Array | None, rng: Array | None
    ) -> tuple[Any, Variables]:
        """Outputs and, in train mode, the new ``batch_stats`` (an empty dict otherwise)."""
        kwargs: dict[str, Any] = {self.train_kw: train}
        if self.takes_mask:
            kwargs["mask"] = mask
        if rng is not None:
            kwargs["rngs"] = {"dropout": rng}
        if train:
            kwargs["mutable"] = ["batch_stats"]
        if mask is None:
            out = self.module.apply(variables, x, **kwargs)
        else:
            with _mask_linen_batch_norm(mask):
                out = self.module.apply(variables, x, **kwargs)
        return out if train else (out, {})

    def record_bn_inputs(
        self, record: Callable, variables: Variables, x: Any, mask: Array | None
    ) -> None:
        """A train-mode forward pass calling ``record(path, input, mask, axis)`` at every
        BatchNorm call (the mask broadcast to the input; None for a full batch). A fixed key
        feeds dropout, so the pass is deterministic."""

        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
                x_in = args[0] if args else kwargs["x"]
                m = kwargs.get("mask")
                if m is None and mask is not None:
                    m = broadcast_mask(mask, x_in, "/".join(module.path))
                record(tuple(module.path), x_in, m, module.axis)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            self.apply(variables, x, train=True, mask=mask, rng=jax.random.key(0))


def check_per_example(name: str, values: Any, batch: int) -> None:
    """Raise unless a loss or metric gave one value per example (shape ``[B]``)."""
    shape = getattr(values, "shape", None)
    if shape != (batch,):
        raise ValueError(
            f"{name} must return one value per example, shape ({batch},), got "
            f"{shape if shape is not None else type(values).__name__}; reduce over every "
            "other axis inside it (the library masks padding and averages over the batch)."
        )


def batch_size_of(x: Any) -> int:
    """The number of examples of a batch pytree (its leaves' leading axis)."""
    return int(jax.tree.leaves(x)[0].shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
    """Model, per-example loss and metrics, and augmentation (module docstring).

    ``loss(outputs, y) -> [B]`` and each ``metrics[name](outputs, y) -> [B]``; ``augment(key,
    x_B) -> x_B`` runs inside the jitted training step on training batches only.
    """

    model: Any  # the user's model: a flax.linen Module or an nnx.Module
    adapter: Any  # LinenModel or NnxModel
    loss: PerExample = softmax_cross_entropy
    metrics: Mapping[str, PerExample] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_METRICS)
    )
    augment: Augment | None = None
    classification: bool = True  # labels are class ids (range checks apply)

    def _key(self) -> tuple:
        return (self.adapter, self.loss, tuple(self.metrics.items()), self.augment)

    def __eq__(self, other: object) -> bool:
        """Equal tasks trace to the same programs (jit keys on them)."""
        return isinstance(other, Task) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def init(self, rng: Array, x: Any) -> Variables:
        """The starting variables: Linen ``init`` from ``rng``; an NNX module's own values."""
        return self.adapter.init(rng, x)

    def apply(
        self,
        variables: Variables,
        x: Any,
        *,
        train: bool,
        mask: Array | None = None,
        rng: Array | None = None,
    ) -> tuple[Any, Variables]:
        """``(outputs, new batch_stats)`` in the stated mode; eval mode returns ``{}``."""
        return self.adapter.apply(variables, x, train=train, mask=mask, rng=rng)

    def outputs(self, variables: Variables, x: Any) -> Any:
        """Eval-mode outputs (``train=False``)."""
        return self.apply(variables, x, train=False)[0]

    def per_example(self, outputs: Any, y: Any) -> tuple[Array, dict[str, Array]]:
        """The loss ``[B]`` and every metric ``[B]`` of a batch, shapes checked."""
        batch = batch_size_of(outputs)
        loss = self.loss(outputs, y)
        check_per_example("loss", loss, batch)
        values = {}
        for name, fn in self.metrics.items():
            values[name] = fn(outputs, y)
            check_per_example(f"metric {name!r}", values[name], batch)
        return loss, values

    def augmented(self, rng: Array, x: Any) -> Any:
        """``augment(rng, x)`` with its output's shapes and dtypes checked (at trace time)."""
        if self.augment is None:
            return x
        out = self.augment(rng, x)
        want = jax.tree.map(lambda a: (a.shape, a.dtype), x)
        got = jax.tree.map(lambda a: (a.shape, a.dtype), out)
        if want != got:
            raise ValueError(
                "augment must return a batch of the same shapes and dtypes as its input: "
                f"expected {want}, got {got}. Convert dtypes (e.g. normalization) in the data or "
                "the model, not in augment (it runs on training batches only)."
            )
        return out


def make_task(
    model: Any,
    *,
    loss: PerExample | None = None,
    metrics: Mapping[str, PerExample] | None = None,
    augment: Augment | None = None,
    train_kw: str = "train",
) -> Task:
    """A :class:`Task` for a Linen or NNX ``model``; a given Task passes through unchanged.

    ``loss`` defaults to softmax cross-entropy on integer labels, ``metrics`` to accuracy with
    the default loss and to none with a custom one (pass ``metrics=`` to keep accuracy).
    """
    if isinstance(model, Task):
        return model
    if is_nnx(model):
        from fedjax_bn.nnx_model import NnxModel  # flax.nnx loads only for NNX models

        adapter: Any = NnxModel.wrap(model)
    elif isinstance(model, nn.Module):
        adapter = LinenModel(model, train_kw)
    else:
        raise TypeError(
            f"model must be a flax.linen Module or a flax.nnx Module, got {type(model).__name__}."
        )
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a function (outputs, y) -> [B], got {loss!r}.")
    if augment is not None and not callable(augment):
        raise TypeError(f"augment must be a function (key, x_B) -> x_B, got {augment!r}.")
    if metrics is None:
        metrics = DEFAULT_METRICS if loss is None else {}
    return Task(
        model=model,
        adapter=adapter,
        loss=softmax_cross_entropy if loss is None else loss,
        metrics=dict(metrics),
        augment=augment,
        classification=loss is None or "accuracy" in metrics,
    )


_TASKS: dict[int, tuple[Any, Task]] = {}


def as_task(model: Any) -> Task:
    """``model`` as a default :class:`Task` (cached per model object, so jitted functions
    keyed on the task do not re-trace); a Task is returned as is."""
    if isinstance(model, Task):
        return model
    hit = _TASKS.get(id(model))
    if hit is None or hit[0] is not model:
        hit = (model, make_task(model))
        _TASKS[id(model)] = hit
    return hit[1]
