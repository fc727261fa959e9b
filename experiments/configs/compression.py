"""Compression: accuracy against uplink bytes (the compression half of
docs/robust_and_compression.md).

Digits with Dirichlet(0.5) label skew, 10 clients, FedAvg on the default model and optimizer
(SeedCNN 32/64 + FC 128, Adam 5e-4 + coupled L2 1e-4, batch 32, one local epoch), 40 rounds,
seeds 0, 1, 2. Each algorithm is FedAvg with the compressor after its ``+``
(``experiments/compression.py``): stochastic quantization to 1/2/4/8 bits, top-k of 1% and
10% without and with error feedback (``ef_``), sparse ternary compression (STC) of 1% with
error feedback (as Sattler et al. use it), and no compression.

    python -m experiments.run --config=experiments/configs/compression.py
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base

SPECS = ("q1", "q2", "q4", "q8", "top0.01", "top0.1", "ef_top0.01", "ef_top0.1", "ef_stc0.01")


def get_config() -> ml_collections.ConfigDict:
    """The compression study on digits."""
    c = base.get_config()
    c.name = "compression"
    c.settings = ("digits_label_skew",)
    c.algorithms = ("fedavg", *(f"fedavg+{s}" for s in SPECS))
    c.seeds = (0, 1, 2)
    c.eval_every = 5
    return c
