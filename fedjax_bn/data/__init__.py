"""Data: digits, Fashion-MNIST and tensorflow-datasets sets, partitions, domains, batching."""

from fedjax_bn.data import augment
from fedjax_bn.data.builders import (
    digits_feature_shift,
    digits_iid,
    digits_label_skew,
    feature_shift,
    iid,
    label_skew,
)
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
from fedjax_bn.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    fashion_mnist_feature_shift,
    fashion_mnist_files,
    fashion_mnist_iid,
    fashion_mnist_label_skew,
    load_fashion_mnist,
)
from fedjax_bn.data.federated import (
    ClientArrays,
    FederatedData,
    federate,
    from_client_arrays,
    pooled_test,
    stack_clients,
)
from fedjax_bn.data.idx import read_idx, write_idx
from fedjax_bn.data.labels import check_client_labels, class_ids
from fedjax_bn.data.partition import (
    dirichlet_partition,
    dirichlet_partition_with_proportions,
    dirichlet_proportions,
    iid_partition,
    partition_by_proportions,
)
from fedjax_bn.data.tfds import DatasetNotPreparedError, load_tfds, tfds_iid, tfds_label_skew

__all__ = [
    "augment",
    "DOMAINS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "ClientArrays",
    "DatasetNotPreparedError",
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
    "fashion_mnist_feature_shift",
    "fashion_mnist_files",
    "fashion_mnist_iid",
    "fashion_mnist_label_skew",
    "feature_shift",
    "check_client_labels",
    "class_ids",
    "federate",
    "from_client_arrays",
    "flip",
    "gamma",
    "identity",
    "invert",
    "iid",
    "iid_partition",
    "label_skew",
    "load_tfds",
    "load_digits",
    "load_fashion_mnist",
    "low_contrast",
    "noise",
    "partition_by_proportions",
    "pooled_test",
    "read_idx",
    "rotate90",
    "stack_clients",
    "tfds_iid",
    "tfds_label_skew",
    "write_idx",
]
