"""On-device batching of a round: per-client shuffled batch indices and masks, one layout.

Client ``c`` gets ``S = epochs * ceil(n_max / B)`` steps; in each epoch its ``ceil(n_c / B)``
real steps come first, then masked no-op steps. Every executor reads this one layout.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def steps_per_epoch(n_max: int, batch_size: int) -> int:
    """Batches per epoch of the padded layout: ceil(n_max / batch_size)."""
    if n_max < 1 or batch_size < 1:
        raise ValueError(f"n_max and batch_size must be >= 1, got {n_max} and {batch_size}.")
    return math.ceil(n_max / batch_size)


def _epoch_layout(key: jax.Array, n_c: jax.Array, n_max: int, padded: int):
    """One epoch for one client: (idx [padded], mask [padded]) with valid positions first."""
    perm = jax.random.permutation(key, n_max)
    # Stable sort keeps the random order of the valid positions and pushes invalid ones last.
    order = jnp.argsort(perm >= n_c, stable=True)
    positions = jnp.arange(n_max)
    mask = positions < n_c
    idx = jnp.where(mask, perm[order], 0).astype(jnp.int32)
    pad = padded - n_max
    return jnp.pad(idx, (0, pad)), jnp.pad(mask, (0, pad))


def round_batches(
    key: jax.Array, n: jax.Array, n_max: int, batch_size: int, epochs: int
) -> tuple[jax.Array, jax.Array]:
    """Per-client shuffled batch indices and masks for one round of local training.

    Returns (idx [C, S, B] int32, mask [C, S, B] bool), S = epochs * ceil(n_max / B). Each
    epoch visits each of client c's ``n[c]`` examples once; padded slots point at index 0 and
    are masked. Pure jnp (n_max, batch_size, epochs static), so it jits with the round.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    spe = steps_per_epoch(n_max, batch_size)
    num_clients = n.shape[0]
    keys = jax.vmap(lambda k: jax.random.split(k, epochs))(jax.random.split(key, num_clients))
    layout = jax.vmap(  # over clients
        jax.vmap(_epoch_layout, in_axes=(0, None, None, None)),  # over epochs
        in_axes=(0, 0, None, None),
    )
    idx, mask = layout(keys, jnp.asarray(n), n_max, spe * batch_size)
    shape = (num_clients, epochs * spe, batch_size)
    return idx.reshape(shape), mask.reshape(shape)


def valid_steps(n_c: int, n_max: int, batch_size: int, epochs: int) -> np.ndarray:
    """Host: the steps in [0, S) of ``round_batches`` that hold any example of a size-n_c client."""
    spe = steps_per_epoch(n_max, batch_size)
    if not 0 <= n_c <= n_max:
        raise ValueError(f"n_c must lie in [0, n_max={n_max}], got {n_c}.")
    real = math.ceil(n_c / batch_size)
    return np.array([e * spe + j for e in range(epochs) for j in range(real)], dtype=np.int64)


def gather_batch(x_N: jax.Array, y_N: jax.Array, idx_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gathers one batch of a client's examples by index along axis 0."""
    return jnp.take(x_N, idx_B, axis=0), jnp.take(y_N, idx_B, axis=0)
