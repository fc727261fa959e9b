"""BatchNorm methods side by side on the embedded digits: the study of docs/bn_methods.md.

Label skew (Dirichlet 0.5) and feature shift (one image domain per client), 10 clients, 3
seeds, the default model and optimizer (SeedCNN 32/64 + FC 128, Adam 5e-4 + coupled L2 1e-4,
batch 32, one local epoch, 40 rounds). Methods:

- ``fedavg``: BN statistics pooled over the union of the clients' data (running averages);
- ``fedavg_recal``: the same training, evaluated after exact BN recalibration (HeteroFL);
- ``fixbn``: FedAvg until round 20, then BN frozen on the pooled statistics (FixBN);
- ``fedbn``: BN layers kept per client; ``silobn``: BN statistics per client, affine shared;
- ``fedavg_group``: GroupNorm instead of BN; ``fedavg_ws``: no normalization, weight-
  standardized convolutions (FedWon's idea);
- ``fedprox_bn_eval``: FedProx with BN left in eval mode while training (the original bug).

    python -m experiments.run --config=experiments/configs/bn_methods.py
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base

# What this study's values of base.HELP's fields mean (printed by --help).
HELP: dict[str, str] = {
    "fix_round": "half of the 40 rounds train as FedAvg, then BN is frozen",
}


def get_config() -> ml_collections.ConfigDict:
    """The BN-methods study on digits."""
    c = base.get_config()
    c.name = "bn_methods"
    c.settings = ("digits_label_skew", "digits_feature_shift")
    c.algorithms = (
        "fedavg",
        "fedavg_recal",
        "fixbn",
        "fedbn",
        "silobn",
        "fedavg_group",
        "fedavg_ws",
        "fedprox_bn_eval",
    )
    c.seeds = (0, 1, 2)
    c.fix_round = 20
    return c
