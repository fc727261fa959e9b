"""The federated data set type: clients stacked and zero-padded, built from index parts or
from per-client arrays the user already has."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.struct
import jax
import numpy as np


@flax.struct.dataclass
class ClientArrays:
    """Per-client arrays stacked along a leading client axis, zero-padded to ``N_max``."""

    x: jax.Array  # [C, N_max, H, W, Ch], any dtype, zero past each client's size
    y: jax.Array  # [C, N_max] int32, zero past each client's size
    n: jax.Array  # [C] int32 true sizes

    def client(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Client ``c``'s real examples ``(x, y)`` as host arrays. The row is read whole and
        cut on the host: slicing ``x[c, :n_c]`` on a device array compiles one program per
        distinct size ``n_c``, a row read one per array shape."""
        n = int(np.asarray(jax.device_get(self.n))[c])
        return np.asarray(self.x[c])[:n], np.asarray(self.y[c])[:n]


@flax.struct.dataclass
class FederatedData:
    """Train and test arrays of every client, plus static metadata."""

    train: ClientArrays
    test: ClientArrays
    num_classes: int = flax.struct.field(pytree_node=False)
    domains: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def num_clients(self) -> int:
        """The number of clients C."""
        return int(self.train.n.shape[0])

    def train_sizes(self) -> np.ndarray:
        """Host copy of the clients' true train sizes (e.g. for aggregation weights)."""
        return np.asarray(jax.device_get(self.train.n))


def stack_clients(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray]) -> ClientArrays:
    """Stacks per-client (x, y) into padded ``ClientArrays``; N_max >= 1 even if all empty."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(
            f"need the same, non-zero number of x and y arrays, got {len(xs)} and {len(ys)}."
        )
    xs = [np.asarray(x) for x in xs]
    ys = [np.asarray(y) for y in ys]
    for c, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape[0] != y.shape[0] or y.ndim != 1:
            raise ValueError(f"client {c}: x has {x.shape[0]} rows but y has shape {y.shape}.")
        if x.shape[1:] != xs[0].shape[1:]:
            raise ValueError(
                f"client {c}: example shape {x.shape[1:]} differs from client 0's "
                f"{xs[0].shape[1:]}; all clients must share one example shape."
            )
    n = np.array([x.shape[0] for x in xs], dtype=np.int32)
    n_max = max(1, int(n.max()))
    dtype = np.result_type(*[x.dtype for x in xs])
    x_out = np.zeros((len(xs), n_max, *xs[0].shape[1:]), dtype=dtype)
    y_out = np.zeros((len(xs), n_max), dtype=np.int32)
    for c, (x, y) in enumerate(zip(xs, ys, strict=True)):
        x_out[c, : x.shape[0]] = x
        y_out[c, : y.shape[0]] = y
    # device_put, not jnp.asarray: jnp.asarray of a host array compiles a program per shape.
    return ClientArrays(*jax.device_put((x_out, y_out, n)))


def _check_parts(parts: Sequence[np.ndarray], num_examples: int, what: str) -> None:
    """Raises ValueError when a part holds an index outside ``[0, num_examples)``."""
    for c, part in enumerate(parts):
        part = np.asarray(part)
        if part.size and (part.min() < 0 or part.max() >= num_examples):
            raise ValueError(
                f"{what} part of client {c} indexes [{part.min()}, {part.max()}], outside "
                f"[0, {num_examples}); build parts from the same arrays you pass here."
            )


def _check_labels(y: np.ndarray, num_classes: int, what: str) -> None:
    y = np.asarray(y)
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{what} labels must lie in [0, {num_classes}), found values in "
            f"[{bad.min()}, {bad.max()}]; fix the labels or raise num_classes."
        )


def federate(
    x_train: np.ndarray,
    y_train: np.ndarray,
    train_parts: Sequence[np.ndarray],
    x_test: np.ndarray,
    y_test: np.ndarray,
    test_parts: Sequence[np.ndarray],
    *,
    num_classes: int,
    transforms: Sequence[Callable[[np.ndarray], np.ndarray]] | None = None,
    domains: tuple[str, ...] = (),
) -> FederatedData:
    """Builds ``FederatedData`` from index parts; ``transforms[c]`` maps client c's images.

    Every client needs at least one train example; test parts may be empty.
    """
    if len(train_parts) != len(test_parts):
        raise ValueError(
            f"got {len(train_parts)} train parts but {len(test_parts)} test parts; "
            "give one of each per client."
        )
    if transforms is not None and len(transforms) != len(train_parts):
        raise ValueError(f"got {len(transforms)} transforms for {len(train_parts)} clients.")
    if domains and len(domains) != len(train_parts):
        raise ValueError(f"got {len(domains)} domain names for {len(train_parts)} clients.")
    empty = [c for c, p in enumerate(train_parts) if np.asarray(p).size == 0]
    if empty:
        raise ValueError(
            f"clients {empty} have no train examples; every client needs >= 1 (use a "
            "min_size in the partition, a larger alpha, or fewer clients)."
        )
    _check_labels(y_train, num_classes, "train")
    _check_labels(y_test, num_classes, "test")
    _check_parts(train_parts, len(x_train), "train")
    _check_parts(test_parts, len(x_test), "test")

    def split(x, y, parts):
        xs = [np.asarray(x)[np.asarray(p, dtype=np.int64)] for p in parts]
        if transforms is not None:
            xs = [t(xc) for t, xc in zip(transforms, xs, strict=True)]
        return stack_clients(xs, [np.asarray(y)[np.asarray(p, dtype=np.int64)] for p in parts])

    return FederatedData(
        train=split(x_train, y_train, train_parts),
        test=split(x_test, y_test, test_parts),
        num_classes=num_classes,
        domains=tuple(domains),
    )


def pooled_test(data: FederatedData) -> tuple[np.ndarray, np.ndarray]:
    """The union of all clients' unpadded test examples, as host arrays (x, y)."""
    x, y, n = jax.device_get((data.test.x, data.test.y, data.test.n))
    x_out = np.concatenate([x[c, : n[c]] for c in range(len(n))])
    y_out = np.concatenate([y[c, : n[c]] for c in range(len(n))])
    return x_out, y_out


def from_client_arrays(
    train_xs: Sequence[np.ndarray],
    train_ys: Sequence[np.ndarray],
    test_xs: Sequence[np.ndarray],
    test_ys: Sequence[np.ndarray],
    *,
    num_classes: int,
    domains: tuple[str, ...] = (),
) -> FederatedData:
    """``FederatedData`` from a partition the user already has: one (x, y) array pair per
    client for train and for test (``x`` ``[n_c, H, W, C]``, ``y`` ``[n_c]`` integer labels).

    Every client needs at least one train example; test arrays may be empty.
    """
    if len(train_xs) != len(test_xs):
        raise ValueError(
            f"got {len(train_xs)} train clients but {len(test_xs)} test clients; "
            "give one train and one test array pair per client."
        )
    empty = [c for c, y in enumerate(train_ys) if len(y) == 0]
    if empty:
        raise ValueError(f"clients {empty} have no train examples; every client needs >= 1.")
    for what, ys in (("train", train_ys), ("test", test_ys)):
        nonempty = [np.asarray(y) for y in ys if len(y)]
        if nonempty:
            _check_labels(np.concatenate(nonempty), num_classes, what)
    if domains and len(domains) != len(train_xs):
        raise ValueError(f"got {len(domains)} domain names for {len(train_xs)} clients.")
    return FederatedData(
        train=stack_clients(train_xs, train_ys),
        test=stack_clients(test_xs, test_ys),
        num_classes=num_classes,
        domains=tuple(domains),
    )


def check_client_labels(arrays: ClientArrays, num_classes: int) -> None:
    """Raise a ValueError when a real (unpadded) label lies outside ``[0, num_classes)``.

    A host check, meant to run once per data set (a bad label would otherwise train silently
    into a NaN or meaningless model).
    """
    y, n = (np.asarray(a) for a in jax.device_get((arrays.y, arrays.n)))
    real = np.arange(y.shape[1])[None, :] < n[:, None]
    bad = y[real & ((y < 0) | (y >= num_classes))]
    if bad.size:
        raise ValueError(
            f"client labels must lie in [0, {num_classes}) (the model's number of outputs), "
            f"found values in [{bad.min()}, {bad.max()}]; fix the labels or the model's "
            "num_classes."
        )
