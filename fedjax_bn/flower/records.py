"""Pytrees <-> Flower ``ArrayRecord``: one array per leaf, keyed by its pytree path.

No pickling: a record holds arrays only (Flower's numpy serialization); the tree's structure
is the receiver's own template (from ``jax.eval_shape`` of the algorithm), so a record whose
paths, shapes or dtypes differ from what the receiver expects is refused with the first
difference named. Integer and boolean leaves stay integers and booleans. Dtypes numpy cannot
serialize by name (bfloat16 and the other ``ml_dtypes``) travel as their unsigned-integer bits
and are viewed back as the template's dtype.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flwr.app import Array, ArrayRecord

BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def leaf_paths(tree: Any) -> list[tuple[str, Any]]:
    """``[(path string, leaf)]`` of a pytree (``jax.tree_util.keystr`` paths; None is no leaf)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def is_native(dtype: np.dtype) -> bool:
    """Whether numpy serializes ``dtype`` by name (not bfloat16 and other ml_dtypes)."""
    return np.dtype(dtype).kind in "biufc"


def encode(leaf: Any) -> np.ndarray:
    """A leaf as a host array Flower can serialize (ml_dtypes as their bits)."""
    if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
        raise TypeError("PRNG key leaves cannot travel: send jax.random.key_data(key) instead.")
    arr = np.asarray(leaf)
    return arr if is_native(arr.dtype) else arr.view(BITS[arr.dtype.itemsize])


def to_record(tree: Any) -> ArrayRecord:
    """An ``ArrayRecord`` of ``tree``'s leaves, keyed by path (e.g. ``.shared['params']...``)."""
    return ArrayRecord(array_dict={path: Array(encode(leaf)) for path, leaf in leaf_paths(tree)})


def decode(stored: np.ndarray, want: Any, path: str, what: str) -> np.ndarray:
    """``stored`` as the template leaf ``want``'s dtype, checked; ValueError naming ``path``."""
    dtype, shape = np.dtype(want.dtype), tuple(want.shape)
    if not is_native(dtype) and stored.dtype == BITS.get(dtype.itemsize):
        stored = stored.view(dtype)
    if stored.dtype != dtype or stored.shape != shape:
        raise ValueError(
            f"{what}: {path} arrived as {stored.dtype}{list(stored.shape)}, expected "
            f"{dtype}{list(shape)}: the sender runs another model or algorithm (or its data has "
            "another input shape); both sides must build the same Algorithm."
        )
    return stored


def from_record(record: ArrayRecord, template: Any, what: str = "received tree") -> Any:
    """The pytree of ``template``'s structure with ``record``'s arrays, shapes and dtypes
    checked (``template`` leaves: arrays or ``jax.ShapeDtypeStruct``)."""
    paths = leaf_paths(template)
    want, have = {p for p, _ in paths}, set(record.keys())
    if want != have:
        raise ValueError(
            f"{what}: its tree does not match the algorithm's; missing {sorted(want - have)}, "
            f"unexpected {sorted(have - want)}. Both sides must build the same Algorithm."
        )
    leaves = [decode(record[p].numpy(), leaf, p, what) for p, leaf in paths]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


def stack_trees(trees: list[Any]) -> Any:
    """Trees of one structure stacked along a new leading (client) axis, on the host."""
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)
