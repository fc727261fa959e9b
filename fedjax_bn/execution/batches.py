"""On-device batching of a round: per-client shuffled batch indices and masks, one layout.

Client ``c`` gets ``S = epochs * ceil(n_max / B)`` steps; in each epoch its ``ceil(n_c / B)``
real steps come first, then masked no-op steps. Every executor reads this one layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

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


def _client_layout(
    key: jax.Array, n_c: jax.Array, n_max: int, batch_size: int, epochs: int
) -> tuple[jax.Array, jax.Array]:
    """One client's (idx [S, B], mask [S, B]) from its own key (split once per epoch)."""
    spe = steps_per_epoch(n_max, batch_size)
    layout = jax.vmap(_epoch_layout, in_axes=(0, None, None, None))  # over epochs
    idx, mask = layout(jax.random.split(key, epochs), n_c, n_max, spe * batch_size)
    shape = (epochs * spe, batch_size)
    return idx.reshape(shape), mask.reshape(shape)


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
    keys = jax.random.split(key, n.shape[0])
    return jax.vmap(_client_layout, in_axes=(0, 0, None, None, None))(
        keys, jnp.asarray(n), n_max, batch_size, epochs
    )


def client_batches(
    key: jax.Array,
    slot: int,
    num_slots: int,
    n_c: int,
    n_max: int,
    batch_size: int,
    epochs: int,
) -> tuple[jax.Array, jax.Array]:
    """Row ``slot`` of ``round_batches(key, n, n_max, ...)`` for a cohort of ``num_slots``
    clients, computed from that client's size alone: how a deployed client (which never
    sees the others' data) draws the executors' own shuffle."""
    if epochs < 1 or not 0 <= slot < num_slots:
        raise ValueError(f"need epochs >= 1 and 0 <= slot < {num_slots}, got {epochs}, {slot}.")
    own = jax.random.split(key, num_slots)[slot]
    return _client_layout(own, jnp.asarray(n_c), n_max, batch_size, epochs)


def budget_mask(mask_CSB: jax.Array, budget_C: jax.Array) -> jax.Array:
    """``mask_CSB`` with every step past client ``c``'s first ``budget_C[c]`` real steps (steps
    holding any example, in layout order) masked out: a budget as data, so no re-compile."""
    real_CS = jnp.any(mask_CSB, axis=-1)
    keep_CS = jnp.cumsum(real_CS, axis=1) <= jnp.asarray(budget_C)[:, None]
    return mask_CSB & keep_CS[..., None]


def valid_steps(n_c: int, n_max: int, batch_size: int, epochs: int) -> np.ndarray:
    """Host: the steps in [0, S) of ``round_batches`` that hold any example of a size-n_c client."""
    spe = steps_per_epoch(n_max, batch_size)
    if not 0 <= n_c <= n_max:
        raise ValueError(f"n_c must lie in [0, n_max={n_max}], got {n_c}.")
    real = math.ceil(n_c / batch_size)
    return np.array([e * spe + j for e in range(epochs) for j in range(real)], dtype=np.int64)


def gather_batch(x_N: Any, y_N: Any, idx_B: jax.Array) -> tuple[Any, Any]:
    """Gathers one batch of a client's examples by index along axis 0 (inputs and labels may
    be pytrees of arrays)."""
    return jax.tree.map(lambda a: jnp.take(a, idx_B, axis=0), (x_N, y_N))


def batches_from_order(
    orders: Sequence[Sequence[np.ndarray]], n_max: int, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """A round's batches in a given order (e.g. another framework's), in the layout of
    :func:`round_batches`: ``orders[c][e]`` lists the indices client ``c`` visits in epoch
    ``e``, batch by batch (``n_c`` entries in ``[0, n_c)``: a torch ``DataLoader`` epoch with
    ``drop_last=False``). Returns ``(idx [C, S, B], mask [C, S, B])``.
    """
    epochs = {len(o) for o in orders}
    if len(epochs) != 1 or 0 in epochs:
        raise ValueError(f"every client needs the same number (>= 1) of epochs, got {epochs}.")
    (num_epochs,) = epochs
    spe = steps_per_epoch(n_max, batch_size)
    idx = np.zeros((len(orders), num_epochs * spe * batch_size), np.int32)
    mask = np.zeros_like(idx, dtype=bool)
    for c, client in enumerate(orders):
        sizes = {len(np.asarray(e)) for e in client}
        for e, order in enumerate(client):
            order = np.asarray(order, np.int64)
            if len(sizes) != 1 or order.size > n_max or (order.size and order.max() >= order.size):
                raise ValueError(
                    f"client {c}, epoch {e}: an order must list n_c indices in [0, n_c) in every "
                    f"epoch (n_c <= n_max={n_max}); got {order.size} indices, max "
                    f"{order.max() if order.size else None}."
                )
            if order.size and order.min() < 0:
                raise ValueError(f"client {c}, epoch {e}: negative index {order.min()}.")
            start = e * spe * batch_size
            idx[c, start : start + order.size] = order
            mask[c, start : start + order.size] = True
    shape = (len(orders), num_epochs * spe, batch_size)
    return jnp.asarray(idx.reshape(shape)), jnp.asarray(mask.reshape(shape))
