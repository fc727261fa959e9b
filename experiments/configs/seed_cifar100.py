"""The setting of the original bug report, plus standard augmentation: FedProx on CIFAR-100.

CIFAR-100 through tensorflow-datasets, 10 parties, Dirichlet label skew beta=0.5, SeedCNN
(conv+BN+ReLU feature extractor, 2 FC layers), Adam lr 5e-4 with weight decay 1e-4 (coupled L2,
as torch's ``Adam(weight_decay=)``), 75 rounds, FedProx mu=0.001. Variants run side by side:
FedProx with BN in eval mode during training (the bug), FedProx (the fix), FedAvg, FedBN and
FedBN + prox. The executor is ``auto``: vmapped clients on GPU/TPU, sequential on CPU.

Training batches get the standard CIFAR augmentation (``augment = "cifar"``: a random 32x32
crop of the 4-pixel zero-padded image, then a random horizontal flip; evaluation sees the images
as they are). The model is the reported SeedCNN; ``--config.model.name=resnet18`` trains a
ResNet-18 instead (flax-examples style, CIFAR stem; ``--config.model.num_filters`` sets its
width).

Run (after preparing CIFAR-100 into ``--config.data.data_dir``, see README):
``python -m experiments.run --config=experiments/configs/seed_cifar100.py``
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base

# What this study's values of base.HELP's fields mean (printed by --help).
HELP: dict[str, str] = {
    "augment": "standard CIFAR training augmentation: pad-4 random crop + flip",
}


def get_config() -> ml_collections.ConfigDict:
    """The reported CIFAR-100 FedProx setting, with the bug and the fixes as variants."""
    c = base.get_config()
    c.name = "seed_cifar100"
    c.settings = ("tfds_label_skew",)
    c.algorithms = ("fedprox_bn_eval", "fedprox", "fedavg", "fedbn", "fedbn_prox")
    c.rounds = 75
    c.eval_every = 5
    c.mu = 1e-3
    c.executor = "auto"
    c.data.name = "cifar100"
    c.data.alpha = 0.5
    c.data.num_clients = 10
    c.data.min_size = 10
    c.model.name = "seed_cnn"
    c.model.widths = (64, 128, 256)
    c.model.hidden = 256
    c.augment = "cifar"
    c.eval_batch_size = 1000
    return c
