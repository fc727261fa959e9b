"""A seconds-long smoke run: tiny model, 4 clients, 2 rounds, two algorithms."""

from __future__ import annotations

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
    """The default study, shrunk until it runs in seconds."""
    c = base.get_config()
    c.name = "smoke"
    c.algorithms = ("fedavg", "fedbn")
    c.rounds = 2
    c.eval_every = 1
    c.data.num_clients = 4
    c.model.widths = (4,)
    c.model.hidden = 8
    c.monitor.probe_size = 16
    return c
