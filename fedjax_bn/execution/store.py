"""Where a population's per-client state and data live, and moving a cohort's rows to the device.

A population's client state (``FedState.clients``, every leaf ``[N, ...]``) stays on the device
when it fits and on the host as numpy arrays otherwise; a cohort round gathers only its
cohort's rows to the device and scatters the new rows back, so clients that sit out keep their
state bit for bit wherever it lives. Population data (``ClientArrays``) works the same way:
numpy arrays on the host, only the cohort's rows (trimmed to the round's padded size) move.

``auto`` placement keeps the state on the device while its bytes are at most
:func:`device_budget`: ``DEVICE_FRACTION`` of the device's memory limit where the device
reports one (``memory_stats()['bytes_limit']``, GPU/TPU), else ``DEFAULT_DEVICE_BUDGET``
(XLA:CPU reports none; there device and host memory are the same RAM anyway).

Cohort ids follow :mod:`fedjax_bn.sampling`: an id equal to ``N`` is an empty slot; it
gathers client ``N - 1``'s row (a harmless stand-in that gets no data) and is never written.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bn.data import ClientArrays

Array = jax.Array
Placement = Literal["auto", "device", "host"]
PLACEMENTS: tuple[str, ...] = ("auto", "device", "host")
DEVICE_FRACTION = 0.25  # of the device's bytes_limit: room left for the model, batches, XLA
DEFAULT_DEVICE_BUDGET = 4 << 30  # bytes, where the device reports no memory limit


def check_placement(placement: str) -> None:
    """Raise a ValueError naming the valid placements."""
    if placement not in PLACEMENTS:
        raise ValueError(f"Unknown placement {placement!r}; valid: {', '.join(PLACEMENTS)}.")


def tree_nbytes(tree: Any) -> int:
    """Total bytes of a tree's array leaves."""
    return sum(int(np.size(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def device_budget(device: Any = None) -> int:
    """Bytes of client state ``auto`` keeps on ``device`` (default: the first device)."""
    device = device or jax.devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    return int(limit * DEVICE_FRACTION) if limit else DEFAULT_DEVICE_BUDGET


def resolve_placement(placement: Placement, nbytes: int, budget: int | None = None) -> str:
    """``device`` or ``host``: as asked, or for ``auto`` whether ``nbytes`` fits the budget."""
    check_placement(placement)
    if placement != "auto":
        return placement
    return "device" if nbytes <= (device_budget() if budget is None else budget) else "host"


def is_host(tree: Any) -> bool:
    """Whether every leaf is a numpy array (an empty tree counts as on the device)."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(isinstance(x, np.ndarray) for x in leaves)


def to_host(tree: Any) -> Any:
    """Every leaf as a writable numpy array (population data or state kept on the host)."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def place(tree: Any, where: str) -> Any:
    """``tree`` on the ``device`` (jax arrays) or the ``host`` (numpy), moved only if needed."""
    if where == "host":
        return tree if is_host(tree) else to_host(tree)
    return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jnp.asarray(x), tree)


def _rows(ids: np.ndarray, num: int) -> np.ndarray:
    """Row indices for a gather: empty slots (id ``num``) read the last row."""
    return np.minimum(np.asarray(ids), num - 1)


@jax.jit
def _gather_device(tree: Any, rows: Array) -> Any:
    return jax.tree.map(lambda a: a[rows], tree)


def _set_rows(tree: Any, ids: Array, new: Any) -> Any:
    # Empty slots hold id N, out of bounds: mode="drop" leaves every other row untouched.
    return jax.tree.map(lambda a, v: a.at[ids].set(v.astype(a.dtype), mode="drop"), tree, new)


_scatter_device = jax.jit(_set_rows)
# Donated: XLA writes the K rows into the population's buffers instead of copying all N rows
# (measured at N = 100,000 in ``docs/population.md``, "donate_state").
_scatter_device_donated = jax.jit(_set_rows, donate_argnums=0)


def gather(clients: Any, ids: np.ndarray, num_clients: int) -> Any:
    """The cohort's rows ``[K, ...]`` of the population's client state, on the device."""
    rows = _rows(ids, num_clients)
    if is_host(clients):
        return jax.device_put(jax.tree.map(lambda a: a[rows], clients))
    return _gather_device(clients, jnp.asarray(rows, jnp.int32))


def scatter(
    clients: Any, ids: np.ndarray, new: Any, num_clients: int, *, in_place: bool = False
) -> Any:
    """A new population state: the cohort's rows replaced by ``new``, every other row (and
    every empty slot) as it was. By default ``clients`` is left as it was (pure: a copy of
    every row, O(N) a round); ``in_place`` writes the K rows into ``clients`` itself (donated
    device buffers, or the host arrays), O(K), and ``clients`` must not be used afterwards."""
    ids = np.asarray(ids)
    if not is_host(clients):
        fn = _scatter_device_donated if in_place else _scatter_device
        return fn(clients, jnp.asarray(ids, jnp.int32), new)
    keep = ids < num_clients
    new = jax.device_get(new)

    def put(a: np.ndarray, v: np.ndarray) -> np.ndarray:
        out = a if in_place and a.flags.writeable else a.copy()  # read-only: copied once
        out[ids[keep]] = np.asarray(v)[keep].astype(a.dtype)
        return out

    return jax.tree.map(put, clients, new)


@functools.partial(jax.jit, static_argnums=2)
def _cohort_data_device(train: ClientArrays, rows: Array, n_max: int, keep: Array) -> ClientArrays:
    n = jnp.where(keep, train.n[rows], 0).astype(train.n.dtype)
    x, y = jax.tree.map(lambda a: a[rows, :n_max], (train.x, train.y))
    return ClientArrays(x=x, y=y, n=n)


def gather_data(train: ClientArrays, ids: np.ndarray, n_max: int) -> ClientArrays:
    """The cohort's data on the device: its clients' rows, padded to ``n_max`` examples
    (``n_max`` >= the cohort's largest size); empty slots get size 0. ``x`` and ``y`` may be
    pytrees: every leaf is gathered the same way."""
    num = int(train.n.shape[0])
    rows, keep = _rows(ids, num), np.asarray(ids) < num
    if is_host(train.x):
        n = np.where(keep, np.asarray(train.n)[rows], 0).astype(np.asarray(train.n).dtype)
        x, y = jax.tree.map(lambda a: np.asarray(a)[rows, :n_max], (train.x, train.y))
        return jax.device_put(ClientArrays(x=x, y=y, n=n))
    return _cohort_data_device(train, jnp.asarray(rows, jnp.int32), n_max, jnp.asarray(keep))
