"""Personalization baselines next to the BN policies on the embedded digits (the study of
docs/personalization.md).

Label skew (Dirichlet 0.5) and feature shift (one image domain per client), 10 clients, 3
seeds, the default model and optimizer (SeedCNN 32/64 + FC 128, Adam 5e-4 + coupled L2 1e-4,
batch 32, one local epoch, 40 rounds). Methods:

- ``fedavg``; ``fedbn`` (BN layers per client); ``silobn`` (BN statistics per client);
- ``fedper``: the head (``config.head``, SeedCNN's classifier ``Dense_1``) per client;
  ``fedper_fedbn``: head and BN layers per client;
- ``fedrep``: local head trained alone for ``config.head_steps`` steps, then the body alone;
- ``lg_fedavg``: everything but the head per client, the head averaged;
- ``ditto``: a personal model per client, pulled to the global one by ``config.ditto_lambda``.

    python -m experiments.run --config=experiments/configs/personalization.py
    # one seed, one setting, few rounds
    python -m experiments.run --config=experiments/configs/personalization.py \\
        --config.seeds=0 --config.rounds=10 --config.settings=digits_feature_shift
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base

# What this study's values of base.HELP's fields mean (printed by --help).
HELP: dict[str, str] = {
    "head": "SeedCNN's classifier",
    "head_steps": "of a typical digits client's 5 steps a round (1 to 8; 1: head only)",
}


def get_config() -> ml_collections.ConfigDict:
    """The personalization study on digits."""
    c = base.get_config()
    c.name = "personalization"
    c.settings = ("digits_label_skew", "digits_feature_shift")
    c.algorithms = (
        "fedavg",
        "fedbn",
        "silobn",
        "fedper",
        "fedper_fedbn",
        "fedrep",
        "lg_fedavg",
        "ditto",
    )
    c.seeds = (0, 1, 2)
    c.head = "Dense_1"
    c.head_steps = 2
    c.ditto_lambda = 0.1
    return c
