"""FedProx with local BN against plain FedProx and FedBN, on feature shift, stronger mu."""

from __future__ import annotations

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
    """FedBN + proximal term vs its parts, on the feature-shift setting."""
    c = base.get_config()
    c.name = "digits_prox_bn"
    c.settings = ("digits_feature_shift",)
    c.algorithms = ("fedprox", "fedbn", "fedbn_prox")
    c.mu = 1e-2
    return c
