"""Flax NNX models behind the same pure ``init``/``apply`` as Linen ones (``task.py``).

The module given is split once into a static graph and its state; every call merges a fresh
copy from the variables it is given, sets every BatchNorm's ``use_running_average`` and every
module's ``deterministic`` to the mode the library states (so ``model.eval()`` before handing
the model over cannot make local training use running statistics: the seed's bug), reseeds the
module's RNG streams from the step's key, masks padded examples out of every BatchNorm, calls
it, and reads back the new batch statistics. Nothing of the user's module object is mutated.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from typing import Any

import jax
from flax import nnx

from fedjax_bn.masks import broadcast_mask
from fedjax_bn.tree import Variables

Array = jax.Array
_MASK: contextvars.ContextVar[Array | None] = contextvars.ContextVar("fedjax_bn_mask", default=None)
# (record(path, input, mask, axis), {id(batch norm): its path}) while recording BN inputs
_RECORD: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
    "fedjax_bn_record", default=None
)


def _str_keys(tree: Any) -> Any:
    """A pure dict with every key a string (NNX list indices are ints; checkpoints and the
    policy's path matching want strings)."""
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _pure(state: nnx.State) -> dict:
    return _str_keys(nnx.to_pure_dict(state))


def _fill(template: nnx.State, values: dict) -> nnx.State:
    """``template``'s structure with the leaves of the string-keyed ``values``."""
    flat = dict(nnx.to_flat_state(template))
    for path in flat:
        leaf: Any = values
        for k in path:
            leaf = leaf[str(k)]
        flat[path] = flat[path].replace(leaf)
    return nnx.from_flat_state(flat)


@functools.cache
def _masked_class(cls: type) -> type:
    """``cls`` (a BatchNorm) whose calls without a mask take the batch's mask (``_MASK``)."""

    def __call__(self, x, use_running_average=None, *, mask=None):
        batch_mask, recording = _MASK.get(), _RECORD.get()
        if mask is None and batch_mask is not None:
            mask = broadcast_mask(batch_mask, x, type(self).__name__)
        if recording is not None:
            record, paths = recording
            record(paths[id(self)], x, mask, self.axis)
        return cls.__call__(self, x, use_running_average, mask=mask)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


def set_modes(model: nnx.Module, *, train: bool, masked: bool) -> dict[int, tuple[str, ...]]:
    """Every BatchNorm and every module with ``deterministic`` in the stated mode; BatchNorms
    masked (hooked) when the batch has padding. Returns each BatchNorm's path by ``id``."""
    paths = {}
    for path, module in nnx.iter_modules(model):
        if isinstance(module, nnx.BatchNorm):
            module.use_running_average = not train
            paths[id(module)] = tuple(str(p) for p in path)
            if masked:
                module.__class__ = _masked_class(type(module))
        if hasattr(module, "deterministic"):
            module.deterministic = not train
    return paths


@dataclasses.dataclass(frozen=True, eq=False)
class NnxModel:
    """An NNX module as a pure ``init``/``apply`` pair (module docstring)."""

    is_nnx = True  # class attribute: tells callers without importing this module
    module: nnx.Module
    graphdef: Any
    params: nnx.State
    batch_stats: nnx.State
    rng_state: nnx.State
    rng_tags: tuple[str, ...]

    @classmethod
    def wrap(cls, module: nnx.Module) -> NnxModel:
        """Split ``module``; refuse variable types the library cannot place."""
        graphdef, params, batch_stats, rng_state, rest = nnx.split(
            module, nnx.Param, nnx.BatchStat, nnx.RngState, ...
        )
        others = [
            f"{'.'.join(map(str, p))} ({type(v).__name__})" for p, v in nnx.to_flat_state(rest)
        ]
        if others:
            raise TypeError(
                "an NNX model may hold nnx.Param, nnx.BatchStat and RNG state only (each is "
                f"placed by the BN policy); found {', '.join(others)}."
            )
        tags = sorted({v.tag for _, v in nnx.to_flat_state(rng_state) if isinstance(v, nnx.RngKey)})
        return cls(module, graphdef, params, batch_stats, rng_state, tuple(tags))

    def init(self, rng: Array, x: Any) -> Variables:
        """The module's current values (``rng`` and ``x`` are not needed)."""
        del rng, x
        _, params, batch_stats, _ = nnx.split(self.module, nnx.Param, nnx.BatchStat, ...)
        out = {"params": _pure(params)}
        if jax.tree.leaves(batch_stats):
            out["batch_stats"] = _pure(batch_stats)
        return out

    def rngs(self, rng: Array | None) -> nnx.State:
        """The RNG streams' state for one call: each stream keyed ``fold_in(rng, i)`` (its
        tag's index), counts at zero; the module's own keys without ``rng``."""
        if rng is None:
            return self.rng_state
        flat = dict(nnx.to_flat_state(self.rng_state))
        for path, v in flat.items():
            if isinstance(v, nnx.RngKey):
                flat[path] = v.replace(jax.random.fold_in(rng, self.rng_tags.index(v.tag)))
            else:
                flat[path] = v.replace(jax.numpy.zeros_like(v.get_value()))
        return nnx.from_flat_state(flat)

    def apply(
        self,
        variables: Variables,
        x: Any,
        *,
        train: bool,
        mask: Array | None,
        rng: Array | None,
        record: Any = None,
    ) -> tuple[Any, Variables]:
        """Outputs and, in train mode, ``{"batch_stats": ...}`` (empty without BN);
        ``record``: see :meth:`record_bn_inputs`."""
        states = [_fill(self.params, variables["params"])]
        if "batch_stats" in variables:
            states.append(_fill(self.batch_stats, variables["batch_stats"]))
        model = nnx.merge(self.graphdef, *states, self.rngs(rng))
        paths = set_modes(model, train=train, masked=mask is not None or record is not None)
        mask_token = _MASK.set(mask)
        record_token = _RECORD.set(None if record is None else (record, paths))
        try:
            out = model(x)
        finally:
            _MASK.reset(mask_token)
            _RECORD.reset(record_token)
        if not train or "batch_stats" not in variables:
            return out, {}
        return out, {"batch_stats": _pure(nnx.state(model, nnx.BatchStat))}

    def record_bn_inputs(
        self, record: Any, variables: Variables, x: Any, mask: Array | None
    ) -> None:
        """A train-mode forward pass calling ``record(path, input, mask, axis)`` at every
        BatchNorm call; a fixed key feeds the RNG streams (deterministic)."""
        self.apply(variables, x, train=True, mask=mask, rng=jax.random.key(0), record=record)
