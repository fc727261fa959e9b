"""A batch's per-example mask shaped for an activation: how padding is kept out of BatchNorm.

Padded examples (a client's last, partial batch) must not enter BatchNorm's batch statistics;
the library hands the mask to every BatchNorm call (``task.py`` for Linen, ``nnx_model.py``
for NNX), broadcast to the rank of that layer's input.
"""

from __future__ import annotations

import jax

Array = jax.Array


def broadcast_mask(mask_B: Array, x: Array, where: str) -> Array:
    """A per-example mask ``[B]`` shaped to broadcast over an activation ``x`` ``[B, ...]``."""
    if x.ndim == 0 or x.shape[0] != mask_B.shape[0]:
        raise ValueError(
            f"{where}: its input has shape {tuple(x.shape)}, but the batch has "
            f"{mask_B.shape[0]} examples; BatchNorm's input must keep the batch axis first so "
            "padded examples can be masked out of its statistics."
        )
    return mask_B.reshape(mask_B.shape + (1,) * (x.ndim - 1))
