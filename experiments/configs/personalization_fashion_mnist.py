"""The personalization study of docs/personalization.md on Fashion-MNIST (real 28x28 images).

The same eight methods and two settings as ``personalization.py`` (label skew, Dirichlet 0.5;
feature shift, one image domain per client), 10 clients, SeedCNN 32/64 + FC 128 with 2x2
pooling (the model of ``seed_fashion_mnist.py``), Adam 5e-4 + coupled L2 1e-4, batch 32, one
local epoch, FedPer/FedRep/LG-FedAvg head ``Dense_1``, FedRep ``head_steps=2``, Ditto lambda
0.1. Sized for the 2-core CPU: 3 seeds of only 8 rounds on a fixed 2,000-image subset of the
train set (drawn with seed 0, the same for every run; 200 images, 6 or 7 steps a round for a
typical client, about the digits study's client size), evaluated on a fixed 2,000-image subset
of the test set. One seed's 16 runs took about 420 s of CPU (docs/personalization.md reports
seed 0 only). Data: ``apt-get install dataset-fashion-mnist``.

    python -m experiments.run --config=experiments/configs/personalization_fashion_mnist.py
    # the run docs/personalization.md reports
    python -m experiments.run --config=experiments/configs/personalization_fashion_mnist.py \\
        --config.seeds=0
    # one setting, or a subset of methods
    python -m experiments.run --config=experiments/configs/personalization_fashion_mnist.py \\
        --config.settings=fashion_mnist_feature_shift --config.algorithms=fedbn,fedper_fedbn
"""

from __future__ import annotations

import ml_collections

from experiments.configs import personalization, seed_fashion_mnist


def get_config() -> ml_collections.ConfigDict:
    """The personalization study on a Fashion-MNIST subset."""
    c = personalization.get_config()
    c.name = "personalization_fashion_mnist"
    c.settings = ("fashion_mnist_label_skew", "fashion_mnist_feature_shift")
    c.data = seed_fashion_mnist.get_config().data
    c.data.max_train = 2000
    c.data.max_test = 2000
    c.rounds = 8
    c.eval_every = 4
    c.eval_batch_size = 1000
    c.executor = "auto"
    return c
