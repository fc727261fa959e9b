"""The bug report's FedProx setting on Fashion-MNIST, read from local IDX files.

10 parties, Dirichlet label skew beta=0.5, SeedCNN (conv3x3+BN+ReLU+2x2 max-pool blocks of
widths 32 and 64, then FC 128 and the classifier), Adam lr 5e-4 with weight decay 1e-4 (coupled
L2, as torch's ``Adam(weight_decay=)``), batch 32, one local epoch, 75 rounds, FedProx mu=0.001.
Variants run side by side: FedProx with BN in eval mode during training (the bug), FedProx (the
fix), FedAvg, FedBN and FedBN + prox. The executor is ``auto``: vmapped clients on GPU/TPU,
sequential on CPU.

Data: ``apt-get install dataset-fashion-mnist`` puts the four IDX files in
``/usr/share/datasets/fashion-mnist`` (the default); ``--config.data.data_dir=DIR`` reads them
from any directory of MNIST-format IDX files instead. By default the train set is a fixed
subset of 12,000 of the 60,000 images (``data.max_train=12000``: a uniform random subset drawn
with seed 0, the same for every experiment seed) to keep CPU runs affordable; the test set is
all 10,000 images (``data.max_test=0``). ``--config.data.max_train=0`` trains on all 60,000.

Cost, measured on the 2-core CPU (shared with other jobs): a plain train step of this model
(422k parameters, batch 32) takes 37 ms at best, 46-64 ms median; a round on the 12,000
images (~380 client steps, sequential executor) took 23 s, an evaluation ~7 s. So 75 rounds
are ~30 minutes per variant, ~2.5 hours for all five; on all 60,000 images (~1,880 steps a
round) roughly 5x that, 10-12 hours: run the full set on a GPU.

Run::

    python -m experiments.run --config=experiments/configs/seed_fashion_mnist.py
    # the full train set
    python -m experiments.run --config=experiments/configs/seed_fashion_mnist.py \\
        --config.data.max_train=0
    # feature shift instead of label skew (client c's images in domain_for_client(c))
    python -m experiments.run --config=experiments/configs/seed_fashion_mnist.py \\
        --config.settings=fashion_mnist_feature_shift
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base

# What this study's values of base.HELP's fields mean (printed by --help).
HELP: dict[str, str] = {
    "data.data_dir": "empty: /usr/share/datasets/fashion-mnist",
    "data.max_train": "0: all 60,000",
    "data.max_test": "all 10,000",
}


def get_config() -> ml_collections.ConfigDict:
    """The reported FedProx setting on Fashion-MNIST, with the bug and the fixes as variants."""
    c = base.get_config()
    c.name = "seed_fashion_mnist"
    c.settings = ("fashion_mnist_label_skew",)
    c.algorithms = ("fedprox_bn_eval", "fedprox", "fedavg", "fedbn", "fedbn_prox")
    c.rounds = 75
    c.eval_every = 5
    c.batch_size = 32
    c.local_epochs = 1
    c.mu = 1e-3
    c.executor = "auto"
    c.data.name = "fashion_mnist"
    c.data.num_clients = 10
    c.data.alpha = 0.5
    c.data.min_size = 10
    c.data.data_dir = ""
    c.data.max_train = 12000
    c.data.max_test = 0
    c.model.name = "seed_cnn"
    c.model.widths = (32, 64)
    c.model.hidden = 128
    c.optim.name = "adam"
    c.optim.lr = 5e-4
    c.optim.weight_decay = 1e-4
    c.eval_batch_size = 1000
    return c
