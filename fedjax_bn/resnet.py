"""ResNet-18 for CIFAR, written the way Flax's own examples write a model.

This is deliberately a model *as users write it*, modelled on ``flax/examples/imagenet/models.py``
and not adapted to this library: ``__call__(self, x, train: bool = True)`` takes the mode as an
ordinary parameter with a default, BatchNorm is a ``functools.partial(nn.BatchNorm,
use_running_average=not train, ...)``, and there is no ``mask`` parameter anywhere. The library
is meant to take such a model unchanged: it states BatchNorm's mode by keyword at every call it
makes, and it masks the padding of a batch for BatchNorm itself, so a model needs neither a
keyword-only ``train`` nor a ``mask``.

``cifar_stem=True`` (the default) is the usual CIFAR stem: a 3x3 stride-1 conv + BN + ReLU and
no max pool, so a 32x32 image reaches the last stage at 4x4. ``cifar_stem=False`` is the
ImageNet stem: 7x7 stride-2 conv + BN + ReLU + 3x3 stride-2 max pool.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any


class ResNetBlock(nn.Module):
    """Basic residual block: two 3x3 conv + BN (+ ReLU), with a 1x1 conv + BN projection
    shortcut when the shape changes (stride or width)."""

    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable = nn.relu
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)

        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)

        return self.act(residual + y)


class ResNet(nn.Module):
    """ResNet with basic blocks: ``stage_sizes[i]`` blocks of ``num_filters * 2**i`` filters,
    each stage after the first starting with a stride-2 block; global average pool, Dense head."""

    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 64
    dtype: Any = jnp.float32
    cifar_stem: bool = True

    @nn.compact
    def __call__(self, x, train: bool = True):
        if jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32) / 255.0
        x = jnp.asarray(x, self.dtype)

        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
        )

        if self.cifar_stem:
            x = conv(self.num_filters, (3, 3), name="conv_init")(x)
            x = norm(name="bn_init")(x)
            x = nn.relu(x)
        else:
            x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(
                x
            )
            x = norm(name="bn_init")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")

        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(
                    self.num_filters * 2**i, conv=conv, norm=norm, act=nn.relu, strides=strides
                )(x)

        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return jnp.asarray(x, self.dtype)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2))
