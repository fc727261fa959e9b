"""Bytes on the wire: a pure function of the message's and the broadcast's shapes and dtypes,
the compressor, and how many clients send and receive, so every executor counts the same.

Uplink, per client that trained: the compressor's bytes for the message's shared float leaves
plus every other leaf of the message at its own size (integer leaves, BN statistics, a step
count, SCAFFOLD's control change). Downlink, per participant: the server's ``shared``,
``pooled`` and ``control`` leaves (what a client reads to start its round; a server optimizer's
state stays on the server).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn.compress.transforms import Compressor
from fedjax_bn.policy import float_leaves
from fedjax_bn.tree import take_client

Array = jax.Array
BROADCAST_FIELDS = ("shared", "pooled", "control")


class WireBytes(NamedTuple):
    """Bytes one client sends (``uplink``) and receives (``downlink``), or a round's totals."""

    uplink: int
    downlink: int


def raw_bytes(tree: Any) -> int:
    """Bytes of every leaf of ``tree`` at its own dtype (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in jax.tree.leaves(tree))


def message_bytes(message: Any, compressor: Compressor | None) -> int:
    """Bytes one client's ``message`` takes: ``compressor.nbytes`` of ``message.shared``'s float
    leaves plus the raw bytes of the rest; without a compressor, the raw bytes of it all."""
    if compressor is None:
        return raw_bytes(message)
    compressed = float_leaves(message.shared)
    return compressor.nbytes(compressed) + raw_bytes(message) - raw_bytes(compressed)


def broadcast_of(server: Any) -> Any:
    """What the server sends each participant: its ``BROADCAST_FIELDS`` (all of it when it has
    none of them)."""
    fields = [getattr(server, f) for f in BROADCAST_FIELDS if hasattr(server, f)]
    return fields if fields else server


def client_bytes(alg: Any, state: Any) -> WireBytes:
    """Bytes one client of ``alg`` sends and receives per round, from shapes only (``state``
    may hold ShapeDtypeStructs; nothing runs or compiles; ``alg.compress`` counted as its
    encoding)."""

    def message(state: Any) -> Any:
        client = take_client(state.clients, 0)
        return alg.client_final(alg.client_init(state.server, client))[0]

    message = jax.eval_shape(message, state)
    compressor = getattr(alg, "compress", None)
    return WireBytes(message_bytes(message, compressor), raw_bytes(broadcast_of(state.server)))


def slot_bytes(
    per_client: WireBytes, num_seen_C: Array, clients_C: Array, population: int
) -> tuple[Array, Array]:
    """Each slot's ``(uplink, downlink)`` bytes ``[C]`` (int32): a slot that took no step sends
    nothing, an empty slot (id >= ``population``) receives nothing."""
    if max(per_client) >= 2**31:
        raise ValueError(f"{per_client} exceeds int32 per client; bytes are counted in int32.")
    up = jnp.where(jnp.asarray(num_seen_C) > 0, per_client.uplink, 0).astype(jnp.int32)
    down = jnp.where(jnp.asarray(clients_C) < population, per_client.downlink, 0)
    return up, down.astype(jnp.int32)


def round_bytes(per_client: WireBytes, num_sent: int, num_received: int) -> WireBytes:
    """A round's totals: ``num_sent`` clients send, ``num_received`` get the broadcast."""
    return WireBytes(per_client.uplink * int(num_sent), per_client.downlink * int(num_received))
