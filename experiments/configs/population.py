"""Partial participation on the embedded digits: 50 clients, a uniform cohort of 10 per round.

Each round samples 10 of the 50 clients (``cohort_size``); clients that sit out keep their local
state (FedBN's and SiloBN's BN layers) bit for bit. 80 rounds, so every client trains about
16 times. History rows name each round's ``cohort``.

    python -m experiments.run --config=experiments/configs/population.py
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
    """The default study with sampled cohorts of a 50-client population."""
    c = base.get_config()
    c.name = "population"
    c.algorithms = ("fedavg", "fedbn", "silobn")
    c.rounds = 80
    c.eval_every = 8
    c.data.num_clients = 50
    c.data.min_size = 5
    c.cohort_size = 10
    return c
