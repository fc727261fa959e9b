"""Splitting a data set's example indices among clients: IID and Dirichlet label skew.

All functions are numpy-only and deterministic given their seed.
"""

from __future__ import annotations

import numpy as np


def iid_partition(
    num_examples: int, num_clients: int, *, seed: int, allow_empty: bool = False
) -> list[np.ndarray]:
    """Shuffles ``range(num_examples)`` and splits it into ``num_clients`` near-equal parts.

    Each part is a sorted int64 index array; sizes differ by at most one. More clients than
    examples is an error unless ``allow_empty`` (test sets of large populations: some clients
    then hold no test example).
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    if num_clients > num_examples and not allow_empty:
        raise ValueError(
            f"more clients than examples: num_clients={num_clients} > "
            f"num_examples={num_examples}; use fewer clients."
        )
    perm = np.random.default_rng(seed).permutation(num_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def dirichlet_proportions(
    num_classes: int, num_clients: int, alpha: float, *, rng: np.random.Generator
) -> np.ndarray:
    """Draws a ``[num_classes, num_clients]`` matrix whose row k is Dir(alpha) over clients.

    Row k says which share of class k's examples each client receives; small ``alpha`` gives
    strong label skew, large ``alpha`` approaches IID.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}; small values mean strong skew.")
    if num_classes < 1 or num_clients < 1:
        raise ValueError(
            f"num_classes and num_clients must be >= 1, got {num_classes} and {num_clients}."
        )
    return rng.dirichlet(np.full(num_clients, float(alpha)), size=num_classes)


def _check_labels(labels: np.ndarray, num_classes: int | None) -> tuple[np.ndarray, int]:
    """Validates 1-D integer labels in [0, num_classes); returns them and num_classes."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D integer array of class ids, got shape {labels.shape} and "
            f"dtype {labels.dtype}; pass class ids such as y_train.astype(int) (for float, "
            "multi-hot or pytree y, the class ids to partition by, e.g. y['class'])."
        )
    if labels.size == 0:
        raise ValueError("labels is empty; there is nothing to partition.")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), but {bad.size} labels lie in "
            f"[{bad.min()}, {bad.max()}]; fix the labels or raise num_classes."
        )
    return labels, num_classes


def partition_by_proportions(
    labels: np.ndarray, proportions: np.ndarray, *, seed: int
) -> list[np.ndarray]:
    """Cuts each class's shuffled indices among clients by ``proportions[class]``.

    Cut points come from the rounded cumulative sum of a class's row, so every index is used
    exactly once. Returns one sorted int64 index array per client (possibly empty).
    """
    proportions = np.asarray(proportions, dtype=np.float64)
    if proportions.ndim != 2:
        raise ValueError(
            f"proportions must be [num_classes, num_clients], got shape {proportions.shape}."
        )
    num_classes, num_clients = proportions.shape
    labels, _ = _check_labels(labels, num_classes)
    if np.any(proportions < 0) or not np.allclose(proportions.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("each row of proportions must be non-negative and sum to 1.")
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for k in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == k))
        cuts = np.round(np.cumsum(proportions[k])[:-1] * idx.size).astype(np.int64)
        cuts = np.clip(np.maximum.accumulate(cuts), 0, idx.size)
        for c, piece in enumerate(np.split(idx, cuts)):
            parts[c].append(piece)
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]


def dirichlet_partition_with_proportions(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    min_size: int = 10,
    seed: int,
    num_classes: int | None = None,
    max_attempts: int = 100,
) -> tuple[list[np.ndarray], np.ndarray]:
    """Dirichlet label-skew partition; returns (parts, the proportions that produced them).

    Proportions are resampled until every client holds at least ``min_size`` examples, so the
    same proportions can be reused to split a test set consistently.
    """
    labels, num_classes = _check_labels(labels, num_classes)
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}; small values mean strong skew.")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
    if num_clients > labels.size:
        raise ValueError(
            f"more clients than examples: num_clients={num_clients} > {labels.size} labels; "
            "use fewer clients."
        )
    if min_size < 0 or max_attempts < 1:
        raise ValueError(
            f"min_size must be >= 0 and max_attempts >= 1, got {min_size} and {max_attempts}."
        )
    rng = np.random.default_rng(seed)
    best = -1
    if min_size * num_clients <= labels.size:
        for _ in range(max_attempts):
            proportions = dirichlet_proportions(num_classes, num_clients, alpha, rng=rng)
            parts = partition_by_proportions(labels, proportions, seed=int(rng.integers(2**63 - 1)))
            smallest = min(p.size for p in parts)
            if smallest >= min_size:
                return parts, proportions
            best = max(best, smallest)
    achieved = "not attempted (impossible)" if best < 0 else str(best)
    raise ValueError(
        f"could not give every client >= min_size={min_size} examples in {max_attempts} "
        f"attempts (num_clients={num_clients}, alpha={alpha}, {labels.size} examples; "
        f"largest smallest-client size achieved: {achieved}). Raise alpha, lower min_size, "
        "or use fewer clients."
    )


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    min_size: int = 10,
    seed: int,
    num_classes: int | None = None,
    max_attempts: int = 100,
) -> list[np.ndarray]:
    """Dirichlet label-skew partition; see ``dirichlet_partition_with_proportions``."""
    parts, _ = dirichlet_partition_with_proportions(
        labels,
        num_clients,
        alpha,
        min_size=min_size,
        seed=seed,
        num_classes=num_classes,
        max_attempts=max_attempts,
    )
    return parts
