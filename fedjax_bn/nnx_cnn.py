"""A Flax NNX CNN with BatchNorm and Dropout, written as NNX users write models.

Conv+BN+ReLU(+2x2 max pool) blocks, global average pooling, then dropout and two dense
layers: the seed's conv+BN+ReLU + 2 FC design in NNX (pooled globally, so any image size
fits). Nothing in it knows about federated training: BN and dropout modes are attributes the
library sets on every call (``fedjax_bn.nnx_model``), and padding is masked by the library.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


class NnxCNN(nnx.Module):
    """``in_channels`` -> conv blocks of ``widths`` -> global mean -> dropout -> FC ``hidden``
    -> FC classes; ``pool`` halves H and W after each block (rounding up)."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 64),
        hidden: int = 128,
        dropout: float = 0.25,
        pool: bool = True,
        rngs: nnx.Rngs,
    ) -> None:
        self.pool = pool
        chans = (in_channels, *widths)
        pairs = zip(chans[:-1], chans[1:], strict=True)
        self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs) for a, b in pairs])
        self.norms = nnx.List([nnx.BatchNorm(w, momentum=0.9, rngs=rngs) for w in widths])
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.fc = nnx.Linear(chans[-1], hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x_BHWC: Array) -> Array:
        x = x_BHWC.astype(jnp.float32)
        if jnp.issubdtype(x_BHWC.dtype, jnp.integer):
            x = x / 255.0
        for conv, norm in zip(self.convs, self.norms, strict=True):
            x = nnx.relu(norm(conv(x)))
            if self.pool:
                x = nnx.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = self.drop(jnp.mean(x, axis=(1, 2)))
        return self.out(nnx.relu(self.fc(x)))
