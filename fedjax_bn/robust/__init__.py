"""Robust aggregation: rules the server folds the clients' updates with, used as
``make_algorithm(..., aggregator=fedjax_bn.robust.median())`` (also ``fedjax_bn.aggregators``).

Every rule ignores zero-weight slots (padding, quarantined clients), acts on the shared float
leaves only (integer leaves keep the server's value), and under the ``fedavg`` policy also folds
the BN running statistics, variances kept non-negative (``docs/robust_and_compression.md``).
"""

from fedjax_bn.robust.base import Aggregator, aggregate, aggregate_batch_stats
from fedjax_bn.robust.coordinate import median, trimmed_mean
from fedjax_bn.robust.distance import (
    geometric_median,
    krum,
    krum_scores,
    mean,
    multi_krum,
    norm_bound,
)

__all__ = [
    "Aggregator",
    "aggregate",
    "aggregate_batch_stats",
    "geometric_median",
    "krum",
    "krum_scores",
    "mean",
    "median",
    "multi_krum",
    "norm_bound",
    "trimmed_mean",
]
