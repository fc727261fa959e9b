"""``fedjax_bn.aggregators``: the robust aggregators of :mod:`fedjax_bn.robust` under the name
the issue's examples use (``fb.aggregators.median()``)."""

from fedjax_bn.robust import (
    Aggregator,
    geometric_median,
    krum,
    mean,
    median,
    multi_krum,
    norm_bound,
    trimmed_mean,
)

__all__ = [
    "Aggregator",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "norm_bound",
    "trimmed_mean",
]
