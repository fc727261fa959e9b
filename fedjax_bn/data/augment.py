"""On-device data augmentation for training batches, run inside the jitted train step.

An augmentation is a pure function ``fn(key, x_BHWC) -> x_BHWC``: ``key`` is a JAX PRNG key,
``x_BHWC`` a batch of images of any dtype (uint8 0..255 or float). It must return a batch of
exactly the input's shape and dtype (:func:`check_augment` checks this once, by tracing), so the
model sees the same kind of input with and without augmentation, and evaluation needs none.

Example::

    augment = cifar_standard()          # random 4-pixel-padded crop, then random horizontal flip
    x_BHWC = augment(key, x_BHWC)       # inside the jitted step, training batches only

:func:`normalize` is *not* an augmentation (it returns float32 and must also apply at evaluation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Augment = Callable[[Array, Array], Array]

# Usual published per-channel (R, G, B) statistics of the training sets, in [0, 1] units.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)


def random_crop(pad: int = 4) -> Augment:
    """Zero-pads H and W by ``pad`` on each side and takes a random HxW crop of each example.

    Each example gets its own offset (one key per example), the CIFAR-standard translation
    augmentation. ``pad=0`` is the identity. The dtype is kept (zeros of the input's dtype).
    """
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}.")

    def crop_one(key: Array, x_HWC: Array) -> Array:
        h, w, c = x_HWC.shape
        x_pad = jnp.pad(x_HWC, ((pad, pad), (pad, pad), (0, 0)))
        dy, dx = jax.random.randint(key, (2,), 0, 2 * pad + 1)
        return jax.lax.dynamic_slice(x_pad, (dy, dx, 0), (h, w, c))

    def fn(key: Array, x_BHWC: Array) -> Array:
        if pad == 0:
            return x_BHWC
        keys = jax.random.split(key, x_BHWC.shape[0])
        return jax.vmap(crop_one)(keys, x_BHWC)

    return fn


def random_flip() -> Augment:
    """Mirrors each example along W (horizontal flip) with probability 0.5, independently.

    Images' content is left-right symmetric in distribution for natural photos (not digits).
    """

    def fn(key: Array, x_BHWC: Array) -> Array:
        flip_B = jax.random.bernoulli(key, 0.5, (x_BHWC.shape[0],))
        return jnp.where(flip_B[:, None, None, None], x_BHWC[:, :, ::-1, :], x_BHWC)

    return fn


def chain(*fns: Augment) -> Augment:
    """Applies ``fns`` in order, member ``i`` with key ``fold_in(key, i)`` (like optax.chain).

    Distinct keys keep the members' random draws independent of one another.
    """

    def fn(key: Array, x_BHWC: Array) -> Array:
        for i, f in enumerate(fns):
            x_BHWC = f(jax.random.fold_in(key, i), x_BHWC)
        return x_BHWC

    return fn


def cifar_standard(pad: int = 4) -> Augment:
    """The CIFAR-standard training augmentation: ``random_crop(pad)`` then ``random_flip()``."""
    return chain(random_crop(pad), random_flip())


def normalize(mean: Sequence[float], std: Sequence[float]) -> Callable[[Array], Array]:
    """Returns ``x -> float32((x / 255 if integer dtype else x) - mean) / std``, per channel.

    Not an augmentation: it changes the dtype and must apply at evaluation too. Apply it once to
    the data on the host, or inside a model, e.g.
    ``fedjax_bn.data.augment.normalize(CIFAR100_MEAN, CIFAR100_STD)(x)``. ``mean``/``std`` are
    in [0, 1] units and broadcast over the last (channel) axis.
    """
    mean_C = np.asarray(mean, np.float32)
    std_C = np.asarray(std, np.float32)
    if mean_C.shape != std_C.shape or mean_C.ndim != 1:
        raise ValueError(f"mean and std must be 1-D of equal length, got {mean!r} and {std!r}.")
    if np.any(std_C <= 0):
        raise ValueError(f"std must be positive, got {std!r}.")

    def fn(x: Array) -> Array:
        x = jnp.asarray(x)
        scaled = x.astype(jnp.float32)
        if jnp.issubdtype(x.dtype, jnp.integer):
            scaled = scaled / 255.0
        return (scaled - mean_C) / std_C

    return fn


def check_augment(fn: Augment, x_BHWC: Array | jax.ShapeDtypeStruct) -> None:
    """Traces ``fn`` abstractly (``jax.eval_shape``, no compute) on a key and a batch shaped like
    ``x_BHWC``; raises ValueError unless it returns the batch's exact shape and dtype."""
    x_spec = jax.ShapeDtypeStruct(tuple(x_BHWC.shape), x_BHWC.dtype)
    key_spec = jax.eval_shape(lambda: jax.random.key(0))
    out = jax.eval_shape(fn, key_spec, x_spec)
    got = (tuple(getattr(out, "shape", ())), getattr(out, "dtype", type(out)))
    want = (x_spec.shape, x_spec.dtype)
    if not isinstance(out, jax.ShapeDtypeStruct) or got != want:
        raise ValueError(
            "augment must return a batch of the same shape and dtype as its input: expected "
            f"shape {want[0]} dtype {want[1]}, got shape {got[0]} dtype {got[1]}."
        )


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "Augment",
    "chain",
    "check_augment",
    "cifar_standard",
    "normalize",
    "random_crop",
    "random_flip",
]
