"""The federated data set type: clients stacked and zero-padded, built from index parts or
from per-client arrays the user already has.

Inputs ``x`` and labels ``y`` are arrays or pytrees of arrays (dicts, tuples): e.g.
``x = {"image": [N, H, W, 3], "meta": [N, 4]}`` or token ids plus a padding mask, and ``y``
class ids ``[N]``, floats (regression), multi-hot ``[N, K]`` or a pytree. Every leaf has the
example axis first (and, once stacked, the client axis before it); the model receives ``x`` as
stored. Class ids (``y`` one integer array ``[N]``, or the array a ``labels=`` argument selects)
are what ``num_classes`` checks and label skew partitions by.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import numpy as np

from fedjax_bn.data.labels import (
    Labels,
    Tree,
    as_tree,
    check_label_range,
    class_ids,
    require_num_classes,
    test_labels_spec,
)


@flax.struct.dataclass
class ClientArrays:
    """Per-client arrays stacked along a leading client axis, zero-padded to ``N_max``.

    ``x`` and ``y`` are arrays or pytrees of arrays, every leaf ``[C, N_max, ...]``.
    """

    x: Tree  # leaves [C, N_max, ...] (e.g. images [C, N_max, H, W, Ch]), zero past n[c]
    y: Tree  # leaves [C, N_max, ...]: int32 when integer (class ids [C, N_max]), zero past n[c]
    n: jax.Array  # [C] int32 true sizes

    @property
    def n_max(self) -> int:
        """The padded number of examples per client: axis 1 of y's leaves (else x's)."""
        leaves = jax.tree.leaves(self.y) or jax.tree.leaves(self.x)
        return int(leaves[0].shape[1])

    def client(self, c: int) -> tuple[Tree, Tree]:
        """Client ``c``'s real examples ``(x, y)`` as host pytrees (numpy leaves). Each leaf's
        row is read whole and cut on the host: slicing ``x[c, :n_c]`` on a device array
        compiles one program per distinct size ``n_c``, a row read one per array shape."""
        n = int(np.asarray(jax.device_get(self.n))[c])

        def cut(a: Any) -> np.ndarray:
            return np.asarray(a[c])[:n]

        return jax.tree.map(cut, self.x), jax.tree.map(cut, self.y)

    def sample_x(self, k: int = 1) -> Tree:
        """Client 0's first ``k`` example slots of ``x`` (``x[0, :k]`` leaf by leaf, left where
        the arrays live), e.g. for a model's init; slots past client 0's size are padding."""
        return jax.tree.map(lambda a: a[0, :k], self.x)


@flax.struct.dataclass
class FederatedData:
    """Train and test arrays of every client, plus static metadata. ``num_classes`` is None
    for data without class ids (regression, multi-hot labels without a stated K, ...)."""

    train: ClientArrays
    test: ClientArrays
    num_classes: int | None = flax.struct.field(pytree_node=False)
    domains: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())

    @property
    def num_clients(self) -> int:
        """The number of clients C."""
        return int(self.train.n.shape[0])

    def train_sizes(self) -> np.ndarray:
        """Host copy of the clients' true train sizes (e.g. for aggregation weights)."""
        return np.asarray(jax.device_get(self.train.n))


def _named_leaves(tree: Tree, name: str) -> list[tuple[str, Any]]:
    """``(name + path, leaf)`` for each leaf, e.g. ``("x['image']", a)``; ``name`` for an array."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(name + jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def num_rows(*named: tuple[str, Tree], where: str = "") -> int:
    """The common leading-axis size of every leaf of the named trees; a ValueError naming the
    leaves when they differ or a leaf has no example axis."""
    leaves = [nl for name, tree in named for nl in _named_leaves(tree, name)]
    if not leaves:
        raise ValueError(f"{where}{' and '.join(n for n, _ in named)} hold no arrays.")
    for name, a in leaves:
        if np.ndim(a) == 0:
            raise ValueError(f"{where}{name} is a scalar; every leaf needs the example axis first.")
    first, rows = leaves[0][0], np.shape(leaves[0][1])[0]
    for name, a in leaves[1:]:
        if np.shape(a)[0] != rows:
            raise ValueError(
                f"{where}{first} has {rows} rows but {name} has {np.shape(a)[0]}; every leaf "
                "needs one row per example."
            )
    return int(rows)


def _stacked_dtype(leaves: Sequence[np.ndarray], is_y: bool) -> np.dtype:
    """x: the clients' common dtype. y: the common dtype of the non-empty clients' leaves
    (an empty ``np.array([])`` must not turn int labels into floats), int32 when integer;
    1-D labels of clients that are all empty are class ids, int32, as before, unless given a
    float dtype other than ``np.array([])``'s float64."""
    if not is_y:
        return np.result_type(*[a.dtype for a in leaves])
    real = [a.dtype for a in leaves if a.shape[0]]
    dtype = np.result_type(*(real or [a.dtype for a in leaves]))
    if not real and all(a.ndim == 1 for a in leaves) and dtype == np.float64:
        return np.dtype(np.int32)
    return np.dtype(np.int32) if np.issubdtype(dtype, np.integer) else dtype


def stack_clients(xs: Sequence[Tree], ys: Sequence[Tree]) -> ClientArrays:
    """Stacks per-client (x, y) into padded ``ClientArrays``; N_max >= 1 even if all empty.

    ``xs[c]`` and ``ys[c]`` are arrays or pytrees of arrays with one structure for every
    client; every leaf of client c has ``n_c`` rows, and a leaf's per-example shape is the same
    for every client. Each leaf becomes ``[C, N_max, ...]``, zero past ``n_c``: x leaves in the
    clients' common dtype, y leaves too except integer ones, int32 (class ids as before).
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError(
            f"need the same, non-zero number of x and y arrays, got {len(xs)} and {len(ys)}."
        )
    xs = [as_tree(x) for x in xs]
    ys = [as_tree(y) for y in ys]
    defs = (jax.tree.structure(xs[0]), jax.tree.structure(ys[0]))
    for c, (x, y) in enumerate(zip(xs, ys, strict=True)):
        for name, tree, want in (("x", x, defs[0]), ("y", y, defs[1])):
            if jax.tree.structure(tree) != want:
                raise ValueError(
                    f"client {c}: {name} has structure {jax.tree.structure(tree)} but client "
                    f"0's is {want}; every client needs the same pytree structure."
                )
    pairs = enumerate(zip(xs, ys, strict=True))
    n = np.array([num_rows(("x", x), ("y", y), where=f"client {c}: ") for c, (x, y) in pairs])
    n = n.astype(np.int32)
    n_max = max(1, int(n.max()))

    def stack(trees: list[Tree], name: str) -> Tree:
        per_client = [_named_leaves(t, name) for t in trees]
        out = []
        for i, (path, first) in enumerate(per_client[0]):
            leaves = [leaves[i][1] for leaves in per_client]
            for c, a in enumerate(leaves):
                if a.shape[1:] != first.shape[1:]:
                    raise ValueError(
                        f"client {c}: {path} has example shape {a.shape[1:]} but client 0's "
                        f"is {first.shape[1:]}; all clients must share one example shape."
                    )
            dtype = _stacked_dtype(leaves, is_y=name == "y")
            stacked = np.zeros((len(leaves), n_max, *first.shape[1:]), dtype=dtype)
            for c, a in enumerate(leaves):
                stacked[c, : a.shape[0]] = a
            out.append(stacked)
        return jax.tree.unflatten(jax.tree.structure(trees[0]), out)

    x_out, y_out = stack(xs, "x"), stack(ys, "y")
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


def federate(
    x_train: Tree,
    y_train: Tree,
    train_parts: Sequence[np.ndarray],
    x_test: Tree,
    y_test: Tree,
    test_parts: Sequence[np.ndarray],
    *,
    num_classes: int | None,
    transforms: Sequence[Callable[[Tree], Tree]] | None = None,
    domains: tuple[str, ...] = (),
    labels: Labels = None,
    test_labels: Labels = None,
) -> FederatedData:
    """Builds ``FederatedData`` from index parts; ``transforms[c]`` maps client c's ``x``
    (its images; the pytree as stored when ``x`` is one).

    ``x``/``y`` are arrays or pytrees of arrays with the example axis first. When there are
    class ids (``y`` one integer array, or where ``labels``/``test_labels`` say, see
    ``class_ids``; a key or callable ``labels`` serves both splits) they must lie in
    ``[0, num_classes)``; ``num_classes`` may be None for data without class ids.
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
    x_train, y_train, x_test, y_test = (as_tree(a) for a in (x_train, y_train, x_test, y_test))
    num_train = num_rows(("x", x_train), ("y", y_train), where="train: ")
    num_test = num_rows(("x", x_test), ("y", y_test), where="test: ")
    for what, y, spec, num in (
        ("train", y_train, labels, num_train),
        ("test", y_test, test_labels_spec(labels, test_labels), num_test),
    ):
        ids = class_ids(y, spec)
        if ids is not None:
            if ids.shape[0] != num:
                raise ValueError(f"{what}: {ids.shape[0]} class ids for {num} examples.")
            check_label_range(ids, require_num_classes(num_classes), what)
    _check_parts(train_parts, num_train, "train")
    _check_parts(test_parts, num_test, "test")

    def split(x, y, parts):
        idx = [np.asarray(p, dtype=np.int64) for p in parts]
        xs = [jax.tree.map(lambda a, i=i: a[i], x) for i in idx]
        if transforms is not None:
            xs = [t(xc) for t, xc in zip(transforms, xs, strict=True)]
        return stack_clients(xs, [jax.tree.map(lambda a, i=i: a[i], y) for i in idx])

    return FederatedData(
        train=split(x_train, y_train, train_parts),
        test=split(x_test, y_test, test_parts),
        num_classes=num_classes,
        domains=tuple(domains),
    )


def pooled_test(data: FederatedData) -> tuple[Tree, Tree]:
    """The union of all clients' unpadded test examples, as host pytrees (x, y)."""
    x, y, n = jax.device_get((data.test.x, data.test.y, data.test.n))

    def pool(a: np.ndarray) -> np.ndarray:
        return np.concatenate([a[c, : n[c]] for c in range(len(n))])

    return jax.tree.map(pool, x), jax.tree.map(pool, y)


def from_client_arrays(
    train_xs: Sequence[Tree],
    train_ys: Sequence[Tree],
    test_xs: Sequence[Tree],
    test_ys: Sequence[Tree],
    *,
    num_classes: int | None = None,
    domains: tuple[str, ...] = (),
    labels: Labels = None,
) -> FederatedData:
    """``FederatedData`` from a partition the user already has: one (x, y) pair per client
    for train and for test. ``x`` and ``y`` are arrays or pytrees of arrays (one structure for
    every client), every leaf ``[n_c, ...]``: e.g. ``x`` ``[n_c, H, W, C]`` or
    ``{"image": ..., "meta": ...}``, ``y`` ``[n_c]`` integer class ids, floats, multi-hot
    ``[n_c, K]`` or a pytree.

    Class ids -- ``y`` itself when it is one integer array, else what ``labels`` (a key or
    index of ``y``, or a callable of one client's ``y``) selects -- must lie in
    ``[0, num_classes)``, and ``num_classes`` is then required; without class ids it may be
    None (or any count kept as metadata). Every client needs at least one train example; test
    arrays may be empty.
    """
    if len(train_xs) != len(test_xs):
        raise ValueError(
            f"got {len(train_xs)} train clients but {len(test_xs)} test clients; "
            "give one train and one test array pair per client."
        )
    if len(train_xs) != len(train_ys) or len(test_xs) != len(test_ys):
        raise ValueError(
            f"got {len(train_xs)} and {len(test_xs)} x but {len(train_ys)} and {len(test_ys)} "
            "y (train and test); give one (x, y) pair per client."
        )
    if labels is not None and not (callable(labels) or isinstance(labels, str | int)):
        raise ValueError(
            "labels= for from_client_arrays is a key or index of each client's y, or a "
            f"callable of it, got {type(labels).__name__}."
        )
    train_xs, train_ys, test_xs, test_ys = (
        [as_tree(a) for a in arrays] for arrays in (train_xs, train_ys, test_xs, test_ys)
    )
    sizes = {
        what: [
            num_rows(("x", x), ("y", y), where=f"{what} client {c}: ")
            for c, (x, y) in enumerate(zip(xs, ys, strict=True))
        ]
        for what, xs, ys in (("train", train_xs, train_ys), ("test", test_xs, test_ys))
    }
    empty = [c for c, n in enumerate(sizes["train"]) if n == 0]
    if empty:
        raise ValueError(f"clients {empty} have no train examples; every client needs >= 1.")
    for what, ys in (("train", train_ys), ("test", test_ys)):
        ids = [class_ids(y, labels) for y, n in zip(ys, sizes[what], strict=True) if n]
        if ids and all(i is not None for i in ids):
            check_label_range(np.concatenate(ids), require_num_classes(num_classes), what)
    if domains and len(domains) != len(train_xs):
        raise ValueError(f"got {len(domains)} domain names for {len(train_xs)} clients.")
    return FederatedData(
        train=stack_clients(train_xs, train_ys),
        test=stack_clients(test_xs, test_ys),
        num_classes=num_classes,
        domains=tuple(domains),
    )
