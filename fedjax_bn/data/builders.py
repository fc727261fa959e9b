"""Ready-made federated data sets: generic IID, Dirichlet label skew and feature shift; digits."""

from __future__ import annotations

import functools

import numpy as np

from fedjax_bn.data.digits import load_digits
from fedjax_bn.data.domains import apply_domain, domain_for_client
from fedjax_bn.data.federated import FederatedData, federate, num_rows
from fedjax_bn.data.labels import Labels, Tree, as_tree, class_ids, test_labels_spec
from fedjax_bn.data.partition import (
    dirichlet_partition_with_proportions,
    iid_partition,
    partition_by_proportions,
)

NUM_DIGIT_CLASSES = 10


def _len(x: Tree, y: Tree, what: str) -> int:
    """The number of examples of a split whose x and y may be pytrees."""
    return num_rows(("x", as_tree(x)), ("y", as_tree(y)), where=f"{what}: ")


def iid(
    x_train: Tree,
    y_train: Tree,
    x_test: Tree,
    y_test: Tree,
    *,
    num_classes: int | None,
    num_clients: int,
    seed: int,
    labels: Labels = None,
    test_labels: Labels = None,
) -> FederatedData:
    """Any (train, test) arrays split IID: each shuffled into near-equal client shares.

    ``x``/``y`` may be pytrees of arrays (example axis first). Class ids, if any (``y`` one
    integer array, or where ``labels``/``test_labels`` say: see ``federate``), are checked
    against ``num_classes``, which may be None without them.
    """
    return federate(
        x_train,
        y_train,
        iid_partition(_len(x_train, y_train, "train"), num_clients, seed=seed),
        x_test,
        y_test,
        iid_partition(_len(x_test, y_test, "test"), num_clients, seed=seed + 1, allow_empty=True),
        num_classes=num_classes,
        labels=labels,
        test_labels=test_labels,
    )


def label_skew(
    x_train: Tree,
    y_train: Tree,
    x_test: Tree,
    y_test: Tree,
    *,
    num_classes: int,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
    labels: Labels = None,
    test_labels: Labels = None,
) -> FederatedData:
    """Any (train, test) arrays with Dir(alpha) label skew; test shares follow the train mix.

    Each class's Dir(alpha) row over clients is drawn once (resampled until every client holds
    >= ``min_size`` train examples) and reused to cut the test set, so a client's test labels
    follow its train labels. Test clients may be small or empty when the test split is small.

    The skew is over class ids: ``y`` itself when it is one integer array ``[N]``; otherwise
    (``x``/``y`` pytrees, float or multi-hot ``y``) pass ``labels=``: an integer array of the
    train split's class ids ``[N_train]`` (then ``test_labels=`` the test split's), or a key or
    callable selecting them from either split's ``y``.
    """
    train_ids = class_ids(y_train, labels)
    test_ids = class_ids(y_test, test_labels_spec(labels, test_labels))
    if train_ids is None or test_ids is None:
        split = "train" if train_ids is None else "test"
        raise ValueError(
            f"label skew needs class ids: pass labels=... ({split} y is not one integer array "
            "[N]; give labels= the train class ids and test_labels= the test ones, or a key "
            "or callable selecting them from y)."
        )
    train_parts, proportions = dirichlet_partition_with_proportions(
        train_ids, num_clients, alpha, min_size=min_size, seed=seed, num_classes=num_classes
    )
    test_parts = partition_by_proportions(test_ids, proportions, seed=seed + 1)
    return federate(
        x_train,
        y_train,
        train_parts,
        x_test,
        y_test,
        test_parts,
        num_classes=num_classes,
        labels=train_ids,
        test_labels=test_ids,
    )


def digits_iid(num_clients: int = 10, *, seed: int = 0) -> FederatedData:
    """Digits split IID: train and test each shuffled into near-equal client shares."""
    x_tr, y_tr, x_te, y_te = load_digits(seed=seed)
    return iid(
        x_tr, y_tr, x_te, y_te, num_classes=NUM_DIGIT_CLASSES, num_clients=num_clients, seed=seed
    )


def digits_label_skew(
    num_clients: int = 10, alpha: float = 0.5, *, seed: int = 0, min_size: int = 10
) -> FederatedData:
    """Digits with Dir(alpha) label skew; each client's test share follows its train mix.

    Test clients may be small or empty: the test split is ~4x smaller than train.
    """
    x_tr, y_tr, x_te, y_te = load_digits(seed=seed)
    return label_skew(
        x_tr,
        y_tr,
        x_te,
        y_te,
        num_classes=NUM_DIGIT_CLASSES,
        num_clients=num_clients,
        alpha=alpha,
        seed=seed,
        min_size=min_size,
    )


def _client_seed(seed: int, client: int) -> int:
    """An independent per-client seed derived from (seed, client)."""
    return int(np.random.SeedSequence((seed, client)).generate_state(1)[0])


def _on_leaf(fn, key, x):
    """``x`` with ``fn`` applied to ``x[key]`` only (a dict's key, a tuple's or list's index)."""
    if isinstance(x, dict):
        return {**x, key: fn(x[key])}
    if isinstance(x, tuple | list):
        out = [fn(a) if i == key else a for i, a in enumerate(x)]
        return type(x)(*out) if hasattr(x, "_fields") else type(x)(out)
    raise ValueError(f"image_key={key!r} needs x to be a dict, tuple or list, got {type(x)}.")


def feature_shift(
    x_train: Tree,
    y_train: Tree,
    x_test: Tree,
    y_test: Tree,
    *,
    num_classes: int | None,
    num_clients: int,
    seed: int,
    labels: Labels = None,
    test_labels: Labels = None,
    image_key: str | int | None = None,
) -> FederatedData:
    """Any (train, test) arrays split IID, client c's images in domain ``domain_for_client(c)``.

    Images must be float NHWC in [0, 1] (what the ``domains`` transforms take; divide uint8
    images by 255 first); the clients' images come back as float32. Same labels everywhere,
    shifted feature statistics, as in FedBN's multi-domain digits. When ``x`` is a dict or
    tuple, ``image_key`` names its image leaf (the only one shifted); ``labels``,
    ``test_labels`` and a None ``num_classes`` as in ``iid``.
    """
    names = tuple(domain_for_client(c) for c in range(num_clients))
    transforms = [
        functools.partial(apply_domain, name=name, seed=_client_seed(seed, c))
        for c, name in enumerate(names)
    ]
    if image_key is not None:
        transforms = [functools.partial(_on_leaf, t, image_key) for t in transforms]
    return federate(
        x_train,
        y_train,
        iid_partition(_len(x_train, y_train, "train"), num_clients, seed=seed),
        x_test,
        y_test,
        iid_partition(_len(x_test, y_test, "test"), num_clients, seed=seed + 1, allow_empty=True),
        num_classes=num_classes,
        transforms=transforms,
        domains=names,
        labels=labels,
        test_labels=test_labels,
    )


def digits_feature_shift(num_clients: int = 10, *, seed: int = 0) -> FederatedData:
    """Digits split IID, with client c's images drawn from domain ``domain_for_client(c)``.

    Mimics FedBN's multi-domain digits: same labels everywhere, shifted feature statistics.
    """
    x_tr, y_tr, x_te, y_te = load_digits(seed=seed)
    return feature_shift(
        x_tr, y_tr, x_te, y_te, num_classes=NUM_DIGIT_CLASSES, num_clients=num_clients, seed=seed
    )
