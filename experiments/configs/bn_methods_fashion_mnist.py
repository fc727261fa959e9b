"""The BatchNorm-methods study of docs/bn_methods.md, on Fashion-MNIST (real 28x28 images).

The same eight methods, 3 seeds and two settings as ``bn_methods.py`` (label skew, Dirichlet
0.5; feature shift, one image domain per client), 10 clients, SeedCNN 32/64 + FC 128 with 2x2
pooling (the model of ``seed_fashion_mnist.py``), Adam 5e-4 + coupled L2 1e-4, batch 32, one
local epoch. Sized for the 2-core CPU: 48 runs of 20 rounds on a fixed 6,000-image subset of
the train set (drawn with seed 0, the same for every run), FixBN's switch at round 10, every
run evaluated on all 10,000 test images. Data: ``apt-get install dataset-fashion-mnist``.

    python -m experiments.run --config=experiments/configs/bn_methods_fashion_mnist.py
    # one setting, or a subset of methods
    python -m experiments.run --config=experiments/configs/bn_methods_fashion_mnist.py \\
        --config.settings=fashion_mnist_feature_shift --config.algorithms=fedavg,fixbn
"""

from __future__ import annotations

import ml_collections

from experiments.configs import bn_methods, seed_fashion_mnist

# What this study's values of base.HELP's fields mean (printed by --help).
HELP: dict[str, str] = {
    "fix_round": "half of the rounds explore as FedAvg, as on digits",
}


def get_config() -> ml_collections.ConfigDict:
    """The BN-methods study on a 6,000-image Fashion-MNIST subset, 20 rounds."""
    c = bn_methods.get_config()
    c.name = "bn_methods_fashion_mnist"
    c.settings = ("fashion_mnist_label_skew", "fashion_mnist_feature_shift")
    c.data = seed_fashion_mnist.get_config().data
    c.data.max_train = 6000
    c.rounds = 20
    c.fix_round = 10
    c.eval_every = 5
    c.eval_batch_size = 1000
    c.executor = "auto"
    return c
