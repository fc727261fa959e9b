"""Partial participation at population scale: 1,000 clients, a uniform cohort of 50 per round.

pfl-research's CIFAR-10 setting in shape (1,000 clients, 50 per round, batch 10, one local
epoch), for fedavg, fedbn, fedadam and scaffold, with feature-shift domains per client (client
c's images in ``domain_for_client(c)``). Clients that sit out keep their state (FedBN's local BN,
SCAFFOLD's control variates) bit for bit; 10 more clients are held out of the population and
evaluated as newcomers, and never-trained clients are evaluated again after AdaBN on their own
images (``adapt_bn``). Intermediate evaluations cover a sample of 100 clients, the last one
all of them. Clients train with SGD (lr 0.05): SCAFFOLD's control variates assume SGD steps,
and FedAdam is the server-side adaptive method of Reddi et al. (SGD clients).

On the embedded digits (the default) 1,437 images over 1,010 clients leave 1-2 images per
client: it measures the machinery and overhead, not learning. On Fashion-MNIST (``apt-get
install dataset-fashion-mnist``) every client has ~59 training images::

    python -m experiments.run --config=experiments/configs/population.py
    python -m experiments.run --config=experiments/configs/population.py \\
        --config.settings=fashion_mnist_feature_shift --config.rounds=30
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
    """1,000 clients (+10 held out), 50 per round, batch 10, SGD clients."""
    c = base.get_config()
    c.name = "population"
    c.settings = ("digits_feature_shift",)
    c.algorithms = ("fedavg", "fedbn", "fedadam", "scaffold")
    c.rounds = 100
    c.eval_every = 25
    c.batch_size = 10
    c.local_epochs = 1
    c.data.num_clients = 1010
    c.held_out = 10
    c.cohort_size = 50
    c.eval_clients = 100
    c.adapt_bn = True
    c.optim.name = "sgd"
    c.optim.lr = 0.05
    c.optim.weight_decay = 0.0
    c.checkpoint_every = 25
    return c
