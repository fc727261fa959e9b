"""Ready-made federated data sets: generic IID, Dirichlet label skew and feature shift; digits."""

from __future__ import annotations

import functools

import numpy as np

from fedjax_bn.data.digits import load_digits
from fedjax_bn.data.domains import apply_domain, domain_for_client
from fedjax_bn.data.federated import FederatedData, federate
from fedjax_bn.data.partition import (
    dirichlet_partition_with_proportions,
    iid_partition,
    partition_by_proportions,
)

NUM_DIGIT_CLASSES = 10


def iid(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    num_clients: int,
    seed: int,
) -> FederatedData:
    """Any (train, test) arrays split IID: each shuffled into near-equal client shares."""
    return federate(
        x_train,
        y_train,
        iid_partition(len(y_train), num_clients, seed=seed),
        x_test,
        y_test,
        iid_partition(len(y_test), num_clients, seed=seed + 1, allow_empty=True),
        num_classes=num_classes,
    )


def label_skew(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 10,
) -> FederatedData:
    """Any (train, test) arrays with Dir(alpha) label skew; test shares follow the train mix.

    Each class's Dir(alpha) row over clients is drawn once (resampled until every client holds
    >= ``min_size`` train examples) and reused to cut the test set, so a client's test labels
    follow its train labels. Test clients may be small or empty when the test split is small.
    """
    train_parts, proportions = dirichlet_partition_with_proportions(
        y_train, num_clients, alpha, min_size=min_size, seed=seed, num_classes=num_classes
    )
    test_parts = partition_by_proportions(y_test, proportions, seed=seed + 1)
    return federate(
        x_train, y_train, train_parts, x_test, y_test, test_parts, num_classes=num_classes
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


def feature_shift(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    num_classes: int,
    num_clients: int,
    seed: int,
) -> FederatedData:
    """Any (train, test) arrays split IID, client c's images in domain ``domain_for_client(c)``.

    Images must be float NHWC in [0, 1] (what the ``domains`` transforms take; divide uint8
    images by 255 first); the clients' images come back as float32. Same labels everywhere,
    shifted feature statistics, as in FedBN's multi-domain digits.
    """
    names = tuple(domain_for_client(c) for c in range(num_clients))
    transforms = [
        functools.partial(apply_domain, name=name, seed=_client_seed(seed, c))
        for c, name in enumerate(names)
    ]
    return federate(
        x_train,
        y_train,
        iid_partition(len(y_train), num_clients, seed=seed),
        x_test,
        y_test,
        iid_partition(len(y_test), num_clients, seed=seed + 1, allow_empty=True),
        num_classes=num_classes,
        transforms=transforms,
        domains=names,
    )


def digits_feature_shift(num_clients: int = 10, *, seed: int = 0) -> FederatedData:
    """Digits split IID, with client c's images drawn from domain ``domain_for_client(c)``.

    Mimics FedBN's multi-domain digits: same labels everywhere, shifted feature statistics.
    """
    x_tr, y_tr, x_te, y_te = load_digits(seed=seed)
    return feature_shift(
        x_tr, y_tr, x_te, y_te, num_classes=NUM_DIGIT_CLASSES, num_clients=num_clients, seed=seed
    )
