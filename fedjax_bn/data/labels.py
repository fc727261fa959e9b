"""Class ids among labels of any form: where they are (``labels=``) and their range checks.

Labels ``y`` are arrays or pytrees; class ids are ``y`` itself when it is one integer array
``[N]`` (``[C, N_max]`` once stacked), or what a ``labels=`` argument selects (a key or index
of ``y``, a callable of it, or the ids themselves). Only class ids are range-checked against
``num_classes`` and partitioned by label skew; other labels (regression, multi-hot) are not.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

Tree = Any  # an array, or a pytree (dict, tuple, ...) of arrays
# Where class ids are (see ``class_ids``): None, a callable of y, a key or index of y, an array.
Labels = Any


def as_tree(v: Any) -> Tree:
    """``v`` with numpy leaves; a (nested) list of plain numbers is one array, as
    ``np.asarray`` reads it (a list of arrays stays a pytree)."""
    if isinstance(v, list) and not any(hasattr(a, "shape") for a in jax.tree.leaves(v)):
        return np.asarray(v)
    return jax.tree.map(np.asarray, v)


def _is_class_ids(y: Tree, ndim: int = 1) -> bool:
    """Whether ``y`` is one integer array of ``ndim`` axes (class ids, one per example)."""
    return (
        isinstance(y, np.ndarray | jax.Array)
        and y.ndim == ndim
        and np.issubdtype(y.dtype, np.integer)
    )


def _select(y: Tree, labels: Labels) -> Any:
    if callable(labels):
        return labels(y)
    if isinstance(labels, str | int) and not isinstance(labels, bool):
        return y[labels]
    return labels


def class_ids(y: Tree, labels: Labels = None) -> np.ndarray | None:
    """The class ids (an integer array ``[N]``) of one split's labels ``y``, or None.

    ``labels`` says where they are: None -- ``y`` itself when it is one integer array ``[N]``
    (float, multi-hot and pytree labels have none: None comes back); a callable --
    ``labels(y)``; a ``str``/``int`` key -- ``y[labels]`` (a dict's key, a tuple's position);
    an array -- the class ids themselves. A selection that is not ``[N]`` integers raises.
    """
    y = as_tree(y)
    if labels is None:
        return y if _is_class_ids(y) else None
    ids = np.asarray(_select(y, labels))
    leaves = jax.tree.leaves(y)
    rows = np.shape(leaves[0])[0] if leaves and np.ndim(leaves[0]) else len(ids)
    if not _is_class_ids(ids) or len(ids) != rows:
        raise ValueError(
            f"labels= must give one integer class id per example (shape [{rows}]), got "
            f"{ids.dtype} {ids.shape}."
        )
    return ids


def check_label_range(y: np.ndarray, num_classes: int, what: str) -> None:
    y = np.asarray(y)
    bad = y[(y < 0) | (y >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{what} labels must lie in [0, {num_classes}), found values in "
            f"[{bad.min()}, {bad.max()}]; fix the labels or raise num_classes."
        )


def test_labels_spec(labels: Labels, test_labels: Labels) -> Labels:
    """Where the test split's class ids are: ``test_labels``, else ``labels`` when it is a key
    or callable (it selects from either split's y); an array of train ids says nothing."""
    if test_labels is not None:
        return test_labels
    return labels if callable(labels) or isinstance(labels, str | int) else None


def require_num_classes(num_classes: int | None) -> int:
    if num_classes is None:
        raise ValueError(
            "the labels are class ids (y one integer array, or labels= given): pass "
            "num_classes= (the model's number of outputs)."
        )
    return num_classes


def check_client_labels(arrays: Any, num_classes: int | None, *, labels: Labels = None) -> None:
    """Raise a ValueError when a real (unpadded) label lies outside ``[0, num_classes)``.

    The labels checked are ``arrays.y`` when it is one integer array ``[C, N_max]`` (class
    ids), else what ``labels`` (a key or index of ``y``, or a callable of it) selects; without
    class ids (float, multi-hot or pytree ``y`` and no ``labels``) or ``num_classes`` there is
    nothing to check. A host check, meant to run once per data set (a bad label would
    otherwise train silently into a NaN or meaningless model).
    """
    y = arrays.y if labels is None else _select(arrays.y, labels)
    if num_classes is None or not _is_class_ids(y, ndim=2):
        if labels is not None and num_classes is not None:
            raise ValueError(
                f"labels= must select integer class ids [C, N_max], got {np.shape(y)}."
            )
        return
    y, n = (np.asarray(a) for a in jax.device_get((y, arrays.n)))
    real = np.arange(y.shape[1])[None, :] < n[:, None]
    bad = y[real & ((y < 0) | (y >= num_classes))]
    if bad.size:
        raise ValueError(
            f"client labels must lie in [0, {num_classes}) (the model's number of outputs), "
            f"found values in [{bad.min()}, {bad.max()}]; fix the labels or the model's "
            "num_classes."
        )
