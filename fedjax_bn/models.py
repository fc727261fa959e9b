"""The library's own Flax linen models, with normalization alternatives.

The library states BN's mode by keyword at every call it makes, whatever a user's model
defaults to (``fedjax_bn.task``); these models also take a keyword-only ``train: bool`` with no
default, because users call them directly too, and there the mode that broke the original
FedProx (BN silently left in eval mode) must not be forgettable. ``mask`` marks the real
examples of a padded batch: BatchNorm computes its batch statistics over them only, so padding
changes nothing (models without a ``mask`` parameter are masked by the library).

``norm`` picks each model's normalization (:data:`NORMS`): ``"batch"`` (the default: exactly
the BatchNorm layers and parameter names these models always had), ``"group"`` (GroupNorm,
Hsieh et al. 2020: ``min(groups, C)`` groups per layer), ``"layer"`` (LayerNorm over each
example's features: ``(H, W, C)`` after a conv, ``C`` after a dense layer) and ``"none"``
(no normalization layer; convolutions are weight-standardized :class:`WSConv`, the FedWon idea,
Zhuang & Lyu, ICLR 2024). Only ``"batch"`` keeps ``batch_stats``; the others accept ``mask``
and ignore it (they normalize each example on its own, so padding cannot leak in).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_bn.resnet import ResNet, ResNet18  # noqa: F401  (re-exported: fb.models.ResNet18)

Array = jax.Array
Norm = Literal["batch", "group", "layer", "none"]
NORMS: tuple[str, ...] = ("batch", "group", "layer", "none")


def to_float_images(x: Array) -> Array:
    """Integer images (uint8 0..255) become float32 in [0, 1]; float images pass through."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32) / 255.0
    return x.astype(jnp.float32)


def _bn_mask(mask: Array | None, ndim: int) -> Array | None:
    """Per-example mask [B] reshaped to broadcast over an activation of rank ``ndim``."""
    if mask is None:
        return None
    return mask.reshape(mask.shape + (1,) * (ndim - 1))


def batch_norm(train: bool, momentum: float, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm in the mode ``train`` asks for: batch statistics when training."""
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, name=name)


def check_norm(norm: str) -> None:
    """Raise a ValueError naming the valid normalization choices."""
    if norm not in NORMS:
        raise ValueError(f"Unknown norm {norm!r}; valid norms: {', '.join(NORMS)}.")


def group_count(channels: int, groups: int, spatial: bool) -> int:
    """GroupNorm's number of groups for ``channels``: ``min(groups, channels)``, which must
    divide ``channels``. Groups of one channel are refused without spatial axes (a dense
    layer's output): each group would be a single value, normalized to zero."""
    g = min(groups, channels)
    if groups < 1 or channels % g:
        raise ValueError(
            f"GroupNorm: {g} groups (min(groups={groups}, channels)) do not divide {channels} "
            "channels; choose widths divisible by the group count or another `groups`."
        )
    if g == channels and not spatial:
        raise ValueError(
            f"GroupNorm with {g} groups of one feature on a {channels}-wide dense layer "
            "normalizes every value to zero; use fewer groups or a wider layer."
        )
    return g


def normalize(
    x: Array,
    norm: Norm,
    *,
    train: bool,
    mask: Array | None,
    momentum: float,
    groups: int,
) -> Array:
    """``x`` through the layer ``norm`` names (``"none"``: unchanged); only BatchNorm reads
    ``train`` and ``mask``. Call inside a compact method: the layer gets the usual auto name."""
    spatial = x.ndim > 2
    if norm == "batch":
        return batch_norm(train, momentum)(x, mask=_bn_mask(mask, x.ndim))
    if norm == "group":
        return nn.GroupNorm(num_groups=group_count(x.shape[-1], groups, spatial))(x)
    if norm == "layer":
        axes = tuple(range(1, x.ndim))  # every feature axis of one example
        return nn.LayerNorm(reduction_axes=axes, feature_axes=-1)(x)
    check_norm(norm)
    return x


def _pool_windows(x: Array) -> Array:
    """``[B, H, W, C]`` -> ``[B, ceil(H/2), ceil(W/2), C, 4]``: each 2x2 window's values in
    row-major order, odd sides padded with -inf at the end (``SAME``)."""
    b, h, w, c = x.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)), constant_values=-jnp.inf)
    h2, w2 = (h + ph) // 2, (w + pw) // 2
    return x.reshape(b, h2, 2, w2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h2, w2, c, 4)


@jax.custom_vjp
def max_pool_2x2(x: Array) -> Array:
    """2x2 max pooling, stride 2, ``SAME`` padding: ``nn.max_pool(x, (2, 2), strides=(2, 2),
    padding="SAME")`` exactly, values and gradients (each window's gradient goes to its first
    maximum, ties included, as XLA's select-and-scatter does).

    Written as window max/argmax and a one-hot scatter because XLA:CPU runs select-and-scatter
    (the gradient of ``reduce_window``) slowly, at the cost of a large part of a 28x28 SeedCNN
    train step (measured in ``docs/startup.md``, "Max pooling")."""
    return _pool_windows(x).max(-1)


def _max_pool_fwd(x: Array) -> tuple[Array, tuple[Array, tuple[int, ...]]]:
    win = _pool_windows(x)
    return win.max(-1), (jnp.argmax(win, -1), x.shape)


def _max_pool_bwd(res: tuple[Array, tuple[int, ...]], g: Array) -> tuple[Array]:
    first, (b, h, w, c) = res
    h2, w2 = g.shape[1], g.shape[2]
    win = jax.nn.one_hot(first, 4, dtype=g.dtype) * g[..., None]
    dx = win.reshape(b, h2, w2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return (dx.reshape(b, 2 * h2, 2 * w2, c)[:, :h, :w, :],)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


def standardize_kernel(kernel: Array, eps: float = 1e-5) -> Array:
    """A conv kernel ``[H, W, in, out]`` with zero mean and unit variance per output channel
    (over ``H, W, in``): weight standardization (Qiao et al. 2019)."""
    axes = tuple(range(kernel.ndim - 1))
    mean = jnp.mean(kernel, axis=axes, keepdims=True)
    var = jnp.var(kernel, axis=axes, keepdims=True)
    return (kernel - mean) * jax.lax.rsqrt(var + eps)


def ws_kernel(kernel: Array, gain: Array | None, eps: float = 1e-5) -> Array:
    """:class:`WSConv`'s effective kernel: ``standardize(W)``, or with a ``gain`` (scaled WS)
    ``gain * standardize(W) / sqrt(fan_in)``, ``fan_in = H * W * in``."""
    w = standardize_kernel(kernel, eps)
    if gain is None:
        return w
    return w * gain / math.sqrt(math.prod(kernel.shape[:-1]))


class WSConv(nn.Module):
    """A convolution whose kernel is weight-standardized per output channel before use.

    ``scaled=True`` (the default; FedWon's and NF-Nets' *scaled* WS, Brock et al. 2021) uses
    ``gain * standardize(W) / sqrt(fan_in)`` with a learnable per-channel ``gain`` (init 1),
    so activations keep their scale through a network without normalization layers;
    ``scaled=False`` uses ``standardize(W)`` itself (zero mean, unit variance per channel).
    The stored ``kernel`` is free; only its standardized form is used (:func:`ws_kernel`).
    """

    features: int
    kernel_size: Sequence[int] = (3, 3)
    padding: str = "SAME"
    scaled: bool = True
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: Array) -> Array:
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, jnp.float32)
        gain = (
            self.param("gain", nn.initializers.ones, (self.features,), jnp.float32)
            if self.scaled
            else None
        )
        y = jax.lax.conv_general_dilated(
            x,
            ws_kernel(kernel, gain, self.eps).astype(x.dtype),
            window_strides=(1,) * len(self.kernel_size),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)


class ConvBNReLU(nn.Module):
    """conv(k x k) + normalization (BatchNorm unless ``norm`` says otherwise) + ReLU,
    optionally followed by 2x2 max pooling. ``norm="none"``: a :class:`WSConv` and no norm."""

    features: int
    kernel: int = 3
    pool: bool = False
    momentum: float = 0.9
    norm: Norm = "batch"
    groups: int = 32  # GroupNorm: min(groups, features) groups

    @nn.compact
    def __call__(self, x: Array, *, train: bool, mask: Array | None = None) -> Array:
        size = (self.kernel, self.kernel)
        if self.norm == "none":
            x = WSConv(self.features, size)(x)
        else:
            x = nn.Conv(self.features, size, padding="SAME")(x)
        x = normalize(
            x, self.norm, train=train, mask=mask, momentum=self.momentum, groups=self.groups
        )
        x = nn.relu(x)
        if self.pool:
            x = max_pool_2x2(x)
        return x


class SeedCNN(nn.Module):
    """The bug report's model: conv(3x3)+BN+ReLU feature blocks, then a 2-layer FC classifier.

    ``pool`` max-pools after every block; ``hidden`` is the width of the first FC layer;
    ``norm`` replaces the blocks' BatchNorm (module docstring; the classifier has none).
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    hidden: int = 128
    pool: bool = True
    momentum: float = 0.9
    norm: Norm = "batch"
    groups: int = 32  # GroupNorm: min(groups, width) groups per block

    def __post_init__(self) -> None:
        check_norm(self.norm)
        super().__post_init__()

    @nn.compact
    def __call__(self, x_BHWC: Array, *, train: bool, mask: Array | None = None) -> Array:
        x = to_float_images(x_BHWC)
        for width in self.widths:
            block = ConvBNReLU(
                width, pool=self.pool, momentum=self.momentum, norm=self.norm, groups=self.groups
            )
            x = block(x, train=train, mask=mask)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class DigitModel(nn.Module):
    """FedBN's digits network (Li et al., ICLR 2021), widths configurable so tests can shrink it.

    conv5x5-64+BN+ReLU+pool, conv5x5-64+BN+ReLU+pool, conv5x5-128+BN+ReLU,
    FC-2048+BN+ReLU, FC-512+BN+ReLU, FC-classes. ``norm`` replaces every BN (module
    docstring); under ``"none"`` the convs are :class:`WSConv` and the FC layers plain dense.
    """

    num_classes: int = 10
    conv_widths: Sequence[int] = (64, 64, 128)
    fc_widths: Sequence[int] = (2048, 512)
    momentum: float = 0.9
    norm: Norm = "batch"
    groups: int = 32  # GroupNorm: min(groups, width) groups per layer

    def __post_init__(self) -> None:
        check_norm(self.norm)
        super().__post_init__()

    @nn.compact
    def __call__(self, x_BHWC: Array, *, train: bool, mask: Array | None = None) -> Array:
        x = to_float_images(x_BHWC)
        last = len(self.conv_widths) - 1
        for i, width in enumerate(self.conv_widths):
            block = ConvBNReLU(
                width,
                kernel=5,
                pool=i < last,
                momentum=self.momentum,
                norm=self.norm,
                groups=self.groups,
            )
            x = block(x, train=train, mask=mask)
        x = x.reshape((x.shape[0], -1))
        for width in self.fc_widths:
            x = nn.Dense(width)(x)
            x = normalize(
                x, self.norm, train=train, mask=mask, momentum=self.momentum, groups=self.groups
            )
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)
