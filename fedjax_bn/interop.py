"""PyTorch weights in and out of the Flax models, without importing torch.

A torch ``state_dict`` and a Flax variable tree name their layers differently, so layers are
matched by position: the torch layers in ``state_dict`` key order (keys grouped by the prefix
before their last ``.``) against the Flax modules holding parameters, in the order they are first
called. The call order is recorded with ``nn.intercept_methods`` on an abstract ``init``
(``jax.eval_shape``: no compute), so it does not depend on dict key order, which ``jax.tree``
operations sort (``BatchNorm_0`` would then come before ``Conv_0``).

Supported layers: 2-D convolutions (torch ``Conv2d``, OIHW <-> Flax HWIO), linear layers
(``Linear``, (out, in) <-> (in, out)) and batch norms (``BatchNorm1d/2d`` with affine weights
and running statistics). Only the ``params`` and ``batch_stats`` collections are mapped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from fedjax_bn.task import as_task

Path = tuple[str, ...]
COUNTER = "num_batches_tracked"
# torch suffix -> (flax collection, flax leaf name), per layer kind, in torch's key order.
_NAMES: dict[str, dict[str, tuple[str, str]]] = {
    "conv": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "linear": {"weight": ("params", "kernel"), "bias": ("params", "bias")},
    "bn": {
        "weight": ("params", "scale"),
        "bias": ("params", "bias"),
        "running_mean": ("batch_stats", "mean"),
        "running_var": ("batch_stats", "var"),
    },
}


@dataclass(frozen=True)
class _Layer:
    """A Flax module holding parameters: its path, kind, leaves, and flatten layout."""

    path: Path
    kind: str
    leaves: dict[tuple[str, str], Any]  # (collection, name) -> array or ShapeDtypeStruct
    # Channels of the activation a linear layer reads flattened; None if not after a flatten.
    flat_channels: int | None

    @property
    def name(self) -> str:
        return "/".join(self.path) or "<root>"


def _flat_channels(path: Path, in_features: int, act: tuple[int, ...]) -> int:
    """Channels C of the activation a linear layer with ``in_features`` inputs reads flattened.

    torch flattens (C, *spatial) and Flax (*spatial, C); both are row-major, so the row
    permutation depends only on C and S = in_features / C, not on how S splits into H and W.
    ``act`` is the last module output before the layer: its C is exact when its size matches,
    and otherwise assumed kept by the ops outside modules in between (pooling, ReLU).
    """
    channels = act[-1]
    if in_features % channels:
        raise ValueError(
            f"cannot infer the channels flax layer {'/'.join(path)!r} reads after a flatten: it "
            f"has {in_features} inputs, not a multiple of the last module output's {channels} "
            f"channels (shape {act}); ops outside modules changed the channel count."
        )
    return channels


def _probe(model: nn.Module, sample_x: Any) -> tuple[Any, list[_Layer]]:
    """The model's variables as shapes (``jax.eval_shape``: nothing runs or compiles) and its
    layers in call order."""
    events: list[tuple[str, Path, tuple[int, ...] | None]] = []

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = tuple(context.module.path)
        events.append(("enter", path, tuple(np.shape(args[0])) if args else None))
        out = next_fun(*args, **kwargs)
        events.append(("exit", path, tuple(out.shape) if hasattr(out, "shape") else None))
        return out

    if not isinstance(model, nn.Module):
        raise TypeError(
            f"from_torch/to_torch map a Linen model's layers in call order; got "
            f"{type(model).__name__} (for an NNX model, copy torch's arrays into its "
            "nnx.Param/nnx.BatchStat values before handing it over)."
        )

    def init(key: jax.Array) -> Any:
        with nn.intercept_methods(record):
            return as_task(model).init(key, sample_x)

    variables = jax.eval_shape(lambda: init(jax.random.key(0)))  # the key too: no program
    direct: dict[Path, dict[tuple[str, str], Any]] = {}
    for (col, *path, leaf), value in traverse_util.flatten_dict(dict(variables)).items():
        if col in ("params", "batch_stats"):
            direct.setdefault(tuple(path), {})[(col, leaf)] = value
    held = {p for p, d in direct.items() if any(c == "params" or n == "mean" for c, n in d)}

    layers: list[_Layer] = []
    last_out: tuple[int, ...] | None = None
    for event, path, shape in events:
        if event == "exit":
            last_out = shape
            continue
        if path not in held or any(layer.path == path for layer in layers):
            continue
        leaves = direct[path]
        kernel = leaves.get(("params", "kernel"))
        flat_channels = None
        if ("batch_stats", "mean") in leaves:
            kind = "bn"
        elif kernel is not None and kernel.ndim == 4:
            kind = "conv"
        elif kernel is not None and kernel.ndim == 2:
            kind = "linear"
            if shape is not None and len(shape) == 2 and last_out and len(last_out) > 2:
                flat_channels = _flat_channels(path, kernel.shape[0], last_out[1:])
        else:
            raise ValueError(f"flax layer {'/'.join(path)!r} is not a 2-D conv, dense or BN")
        layers.append(_Layer(path, kind, leaves, flat_channels))
    if missed := held - {layer.path for layer in layers}:
        raise ValueError(f"flax modules {sorted(missed)} hold parameters but were never called")
    return variables, layers


def _torch_layers(state_dict: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(prefix, kind, {suffix: value}) per torch layer, in key order."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state_dict.items():
        prefix, _, suffix = key.rpartition(".")
        groups.setdefault(prefix, {})[suffix] = value
    out = []
    for prefix, group in groups.items():
        ndim = np.ndim(group["weight"]) if "weight" in group else None
        kind = "bn" if "running_mean" in group else {4: "conv", 2: "linear"}.get(ndim)
        if kind is None:
            raise ValueError(
                f"torch layer {prefix!r} (keys {sorted(group)}) is not a supported kind"
            )
        out.append((prefix, kind, group))
    return out


def _match(
    torch_layers: list[tuple[str, str, dict[str, Any]]], layers: list[_Layer]
) -> list[tuple[str, dict[str, Any], _Layer, dict[str, tuple[str, str]]]]:
    """Pair layers by position; per pair, map each torch suffix to its Flax leaf. Raises on any
    count, kind or key mismatch, naming both sides."""
    kinds = (
        f"torch: {[f'{p} ({k})' for p, k, _ in torch_layers]}; "
        f"flax: {[f'{layer.name} ({layer.kind})' for layer in layers]}"
    )
    for (prefix, kind, _), layer in zip(torch_layers, layers, strict=False):
        if kind != layer.kind:
            raise ValueError(
                f"torch layer {prefix!r} ({kind}) lines up with flax layer {layer.name!r} "
                f"({layer.kind}): the layer orders differ. {kinds}"
            )
    if len(torch_layers) != len(layers):
        n = min(len(torch_layers), len(layers))
        raise ValueError(
            f"the torch state_dict has {len(torch_layers)} layers, the flax model {len(layers)}; "
            f"unmatched torch layers: {[p for p, _, _ in torch_layers[n:]]}, "
            f"unmatched flax layers: {[layer.name for layer in layers[n:]]}. {kinds}"
        )
    pairs = []
    for (prefix, kind, group), layer in zip(torch_layers, layers, strict=True):
        names = {s: n for s, n in _NAMES[kind].items() if n in layer.leaves}
        dot = f"{prefix}." if prefix else ""
        for suffix in group:
            if suffix not in names and suffix != COUNTER:
                raise ValueError(
                    f"torch key {dot + suffix!r} has no flax counterpart in {layer.name!r}"
                )
        for suffix in names:
            if suffix not in group:
                raise ValueError(
                    f"missing torch key {dot + suffix!r} for flax layer {layer.name!r}"
                )
        pairs.append((dot, group, layer, names))
    return pairs


def _torch_shape(layer: _Layer, suffix: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The torch shape of a Flax leaf of ``shape``."""
    if suffix != "weight" or layer.kind == "bn":
        return shape
    return shape[::-1] if layer.kind == "linear" else (shape[3], shape[2], shape[0], shape[1])


def _convert(layer: _Layer, suffix: str, value: np.ndarray, *, to_flax: bool) -> np.ndarray:
    """Torch -> Flax layout (or back): conv OIHW <-> HWIO; linear (out, in) <-> (in, out), with
    the rows of a linear layer after a flatten permuted between (C, S) and (S, C)."""
    if suffix != "weight" or layer.kind == "bn":
        return value
    if layer.kind == "conv":
        return value.transpose((2, 3, 1, 0) if to_flax else (3, 2, 0, 1))
    kernel = value.T if to_flax else value
    if (c := layer.flat_channels) is not None:
        rows = (c, -1) if to_flax else (-1, c)
        kernel = kernel.reshape(*rows, kernel.shape[1]).transpose(1, 0, 2).reshape(kernel.shape)
    return kernel if to_flax else kernel.T


def from_torch(model: nn.Module, state_dict_arrays: Mapping[str, Any], *, sample_x: Any) -> Any:
    """Flax variables for ``model`` holding the weights of a torch ``state_dict`` (as arrays).

    Leaves the torch dict does not cover (e.g. other collections) keep their ``init`` values;
    ``num_batches_tracked`` counters are dropped. Values take the Flax leaves' dtype (float32).
    The layers and shapes come from ``jax.eval_shape``; the model is initialized (one jitted
    init) only when some leaf is left to fill, so a full torch dict costs no compilation.
    """
    shapes, layers = _probe(model, sample_x)
    flat: dict[Any, Any] = {}
    for dot, group, layer, names in _match(_torch_layers(state_dict_arrays), layers):
        for suffix, (col, leaf_name) in names.items():
            leaf = layer.leaves[(col, leaf_name)]
            value = np.asarray(group[suffix])
            expected = _torch_shape(layer, suffix, tuple(leaf.shape))
            if value.shape != expected:
                raise ValueError(
                    f"torch key {dot + suffix!r} has shape {value.shape}, expected {expected} "
                    f"(flax {layer.name}/{leaf_name} of shape {tuple(leaf.shape)})"
                )
            converted = _convert(layer, suffix, value, to_flax=True).astype(leaf.dtype)
            flat[(col, *layer.path, leaf_name)] = jax.device_put(converted)  # jnp.asarray compiles
    return traverse_util.unflatten_dict(_fill(model, sample_x, shapes, flat))


def _fill(model: nn.Module, sample_x: Any, shapes: Any, flat: dict[Any, Any]) -> dict[Any, Any]:
    """``flat`` completed with ``init`` values for the leaves of ``shapes`` it lacks, from one
    jitted init (not op by op); no init at all when the torch dict covered every leaf."""
    missing = [k for k in traverse_util.flatten_dict(dict(shapes)) if k not in flat]
    if not missing:
        return flat
    init = jax.jit(as_task(model).init)(jax.random.key(0), sample_x)
    full = traverse_util.flatten_dict(dict(init))
    return {**{k: full[k] for k in missing}, **flat}


def to_torch(
    model: nn.Module,
    variables: Any,
    *,
    sample_x: Any,
    keys_like: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """A torch-layout ``state_dict`` of numpy arrays from Flax ``variables`` of ``model``.

    Keys and their order come from ``keys_like`` (a state_dict-like mapping whose values have
    shapes, checked against the output; its ``num_batches_tracked`` keys become int64 zeros), or
    are ``"{i}.weight"``-style by layer index when it is None.
    """
    _, layers = _probe(model, sample_x)
    flat = traverse_util.flatten_dict(dict(variables))

    def torch_value(layer: _Layer, suffix: str, col: str, leaf_name: str) -> np.ndarray:
        key = (col, *layer.path, leaf_name)
        if key not in flat:
            raise ValueError(f"variables lack {'/'.join(key)}, which {layer.name!r} holds")
        value = np.asarray(flat[key])
        if value.shape != tuple(layer.leaves[(col, leaf_name)].shape):
            raise ValueError(
                f"variables' {'/'.join(key)} has shape {value.shape}, expected "
                f"{tuple(layer.leaves[(col, leaf_name)].shape)}"
            )
        return _convert(layer, suffix, value, to_flax=False)

    out: dict[str, np.ndarray] = {}
    if keys_like is None:
        for i, layer in enumerate(layers):
            for suffix, (col, leaf_name) in _NAMES[layer.kind].items():
                if (col, leaf_name) in layer.leaves:
                    out[f"{i}.{suffix}"] = torch_value(layer, suffix, col, leaf_name)
        return out
    for dot, group, layer, names in _match(_torch_layers(keys_like), layers):
        for suffix, like in group.items():
            if suffix == COUNTER:
                out[dot + suffix] = np.zeros((), np.int64)
                continue
            value = torch_value(layer, suffix, *names[suffix])
            if value.shape != tuple(np.shape(like)):
                raise ValueError(
                    f"keys_like {dot + suffix!r} has shape {tuple(np.shape(like))}, expected "
                    f"{value.shape} (flax {layer.name}/{names[suffix][1]})"
                )
            out[dot + suffix] = value
    return {key: out[key] for key in keys_like}
