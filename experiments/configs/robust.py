"""Robust aggregation under attack (docs/robust_and_compression.md, robust section).

FedAvg (the weighted mean) against each robust rule of ``fedjax_bn.robust``, each with the BN
running statistics folded by the same rule (``fedavg_<rule>``) or averaged as FedAvg pools them
(``fedavg_<rule>_bnavg``): the BN-specific comparison. 10 clients, Dirichlet(0.5) label skew,
15 rounds, 20% of the clients attacking (``config.attack``; the kind is set per invocation, the
attackers drawn from the seed), Krum's ``f`` the number of attackers, trimmed mean
``beta=0.2``, norm bound 0.5 (about the median norm of an honest update in the first rounds on
digits, 0.2-0.6).

``robust.py`` (or ``robust.py:digits``) is the embedded digits; ``robust.py:fashion_mnist`` a
fixed 2,000-image Fashion-MNIST subset (2,000 test images), 8 rounds, FedAvg against the median
only (a Fashion-MNIST round costs ~10x a digits round on the CPU); the study runs it under the
attacks ``none``, ``scale`` and ``gaussian`` (``robust_study.DEFAULT_KINDS``).
The whole study (every attack kind, both data sets, resumable) is
``python -m experiments.robust_study``; one cell of it::

    python -m experiments.run --config=experiments/configs/robust.py \\
        --config.attack.kind=sign_flip --config.out_dir=experiments/runs/robust/x
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base, seed_fashion_mnist

RULES = ("median", "trimmed_mean", "krum", "multi_krum", "geomed", "norm_bound")
# Fashion-MNIST's rounds cost ~10x digits': FedAvg and the median, BN statistics both ways.
FASHION_ALGORITHMS = ("fedavg", "fedavg_median", "fedavg_median_bnavg")


def get_config(data: str = "digits") -> ml_collections.ConfigDict:
    """The robust study on ``data`` (``digits`` or ``fashion_mnist``), attack kind ``none``."""
    c = base.get_config()
    c.name = f"robust_{data}"
    c.algorithms = ("fedavg", *(f"fedavg_{r}{s}" for r in RULES for s in ("", "_bnavg")))
    c.seeds = (0,)
    c.rounds = 15
    c.eval_every = 15  # the first round and the last are evaluated
    c.tensorboard = False
    c.progress = False
    c.attack.kind = "none"
    c.attack.fraction = 0.2
    c.attack.scale = 10.0
    c.aggregator.beta = 0.2
    c.aggregator.f = 0  # the number of attackers: 2 of 10
    c.aggregator.max_norm = 0.5
    if data == "digits":
        c.settings = ("digits_label_skew",)
    elif data == "fashion_mnist":
        c.settings = ("fashion_mnist_label_skew",)
        c.data = seed_fashion_mnist.get_config().data
        c.algorithms = FASHION_ALGORITHMS
        c.data.max_train = 2000
        c.data.max_test = 2000
        c.rounds = 8
        c.eval_every = 8
        c.eval_batch_size = 1000
    else:
        raise ValueError(f"robust.py takes digits or fashion_mnist, got {data!r}.")
    return c
