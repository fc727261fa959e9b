"""Flax linen models whose BatchNorm mode is always explicit.

Every ``__call__`` takes a keyword-only ``train: bool`` with no default, so the mode that broke
the original FedProx (BN silently left in eval mode) cannot be forgotten. ``mask`` marks the real
examples of a padded batch: BatchNorm computes its batch statistics over them only, so padding
changes nothing.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


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


class ConvBNReLU(nn.Module):
    """conv(k x k) + BatchNorm + ReLU, optionally followed by 2x2 max pooling."""

    features: int
    kernel: int = 3
    pool: bool = False
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x: Array, *, train: bool, mask: Array | None = None) -> Array:
        x = nn.Conv(self.features, (self.kernel, self.kernel), padding="SAME")(x)
        x = batch_norm(train, self.momentum)(x, mask=_bn_mask(mask, x.ndim))
        x = nn.relu(x)
        if self.pool:
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        return x


class SeedCNN(nn.Module):
    """The bug report's model: conv(3x3)+BN+ReLU feature blocks, then a 2-layer FC classifier.

    ``pool`` max-pools after every block; ``hidden`` is the width of the first FC layer.
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    hidden: int = 128
    pool: bool = True
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x_BHWC: Array, *, train: bool, mask: Array | None = None) -> Array:
        x = to_float_images(x_BHWC)
        for width in self.widths:
            x = ConvBNReLU(width, pool=self.pool, momentum=self.momentum)(x, train=train, mask=mask)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


class DigitModel(nn.Module):
    """FedBN's digits network (Li et al., ICLR 2021), widths configurable so tests can shrink it.

    conv5x5-64+BN+ReLU+pool, conv5x5-64+BN+ReLU+pool, conv5x5-128+BN+ReLU,
    FC-2048+BN+ReLU, FC-512+BN+ReLU, FC-classes.
    """

    num_classes: int = 10
    conv_widths: Sequence[int] = (64, 64, 128)
    fc_widths: Sequence[int] = (2048, 512)
    momentum: float = 0.9

    @nn.compact
    def __call__(self, x_BHWC: Array, *, train: bool, mask: Array | None = None) -> Array:
        x = to_float_images(x_BHWC)
        last = len(self.conv_widths) - 1
        for i, width in enumerate(self.conv_widths):
            x = ConvBNReLU(width, kernel=5, pool=i < last, momentum=self.momentum)(
                x, train=train, mask=mask
            )
        x = x.reshape((x.shape[0], -1))
        for width in self.fc_widths:
            x = nn.Dense(width)(x)
            x = batch_norm(train, self.momentum)(x, mask=_bn_mask(mask, x.ndim))
            x = nn.relu(x)
        return nn.Dense(self.num_classes)(x)


def require_train_keyword(model: nn.Module) -> None:
    """Raise unless ``model.__call__`` takes a keyword-only ``train`` with no default (else its
    BN mode could be left implicit, the original bug)."""
    params = inspect.signature(type(model).__call__).parameters
    train = params.get("train")
    if (
        train is None
        or train.kind is not inspect.Parameter.KEYWORD_ONLY
        or train.default is not inspect.Parameter.empty
    ):
        raise TypeError(
            f"{type(model).__name__}.__call__ must take a keyword-only `train: bool` argument "
            "with no default (e.g. `def __call__(self, x, *, train: bool)`) so that "
            "BatchNorm's mode is explicit at every call site."
        )
    if "mask" not in params:
        raise TypeError(
            f"{type(model).__name__}.__call__ must accept `mask=None` and pass it to its "
            "BatchNorm layers, so padded examples do not enter the batch statistics."
        )
