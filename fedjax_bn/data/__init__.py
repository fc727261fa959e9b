"""Data: the digits data set, client partitions, feature-shift domains, federated batching."""

from fedjax_bn.data.builders import digits_feature_shift, digits_iid, digits_label_skew
from fedjax_bn.data.digits import load_digits
from fedjax_bn.data.domains import (
    DOMAINS,
    apply_domain,
    blur,
    domain_for_client,
    flip,
    gamma,
    identity,
    invert,
    low_contrast,
    noise,
    rotate90,
)
from fedjax_bn.data.federated import (
    ClientArrays,
    FederatedData,
    federate,
    gather_batch,
    pooled_test,
    round_batches,
    stack_clients,
    steps_per_epoch,
    valid_steps,
)
from fedjax_bn.data.partition import (
    dirichlet_partition,
    dirichlet_partition_with_proportions,
    dirichlet_proportions,
    iid_partition,
    partition_by_proportions,
)

__all__ = [
    "DOMAINS",
    "ClientArrays",
    "FederatedData",
    "apply_domain",
    "blur",
    "digits_feature_shift",
    "digits_iid",
    "digits_label_skew",
    "dirichlet_partition",
    "dirichlet_partition_with_proportions",
    "dirichlet_proportions",
    "domain_for_client",
    "federate",
    "flip",
    "gamma",
    "gather_batch",
    "identity",
    "invert",
    "iid_partition",
    "load_digits",
    "low_contrast",
    "noise",
    "partition_by_proportions",
    "pooled_test",
    "rotate90",
    "round_batches",
    "stack_clients",
    "steps_per_epoch",
    "valid_steps",
]
