"""BatchNorm under user-level differential privacy: the study of docs/privacy.md.

Fashion-MNIST over 500 clients with feature shift (client c's images in the image domain
``domain_for_client(c)``), on fixed subsets of 15,000 train images (30 per client) and 2,500
test images (5 per client). Each round samples every client independently with probability
``q = 0.1`` (Poisson, 50 clients expected, padded to a bucket), DP-FedAvg with adaptive
clipping toward the median update norm, noise calibrated before training to the
target epsilon at delta = 1/500 over all rounds (RDP accountant). BN policies:

- ``fedbn``: BN layers stay with each client, nothing of BN is released;
- ``silobn``: BN scale/bias inside the clipped, noised update, statistics local;
- ``fedavg``: BN statistics' change inside the clipped, noised update (variances floored);
- ``fixbn``: as ``fedavg`` until ``fix_round``, then BN frozen on the (noised) global statistics
  and nothing of BN statistics released;
- ``fedavg_group``: the same network with GroupNorm instead of BN (nothing statistical to leak).

A small SeedCNN (conv 16/32 + FC 32, ~55k parameters: DP noise grows with the dimension), SGD
clients (lr 0.05, batch 10, one local epoch), 10 rounds, FixBN's freeze at round 5. The
config argument picks epsilon: a number (1, 4, 8) or ``none`` (no DP: fixed-size uniform
cohorts of 50, example-count weights, no clipping, no noise). The whole study, one seed, is
four invocations, then the report (table, ``summary.json``, plots)::

    for eps in none 8 4 1; do
      python -m experiments.run --config=experiments/configs/dp.py:$eps \\
          --config.out_dir=results/dp/eps_$eps
    done
    python -m experiments.dp_study results/dp/eps_{none,8,4,1} --out results/dp/report
"""

from __future__ import annotations

import ml_collections

from experiments.configs import base

NUM_CLIENTS = 500
EXPECTED_COHORT = 50


# What this study's values of base.HELP's fields mean (printed by --help).
HELP: dict[str, str] = {
    "fix_round": "FixBN: half of the rounds explore as FedAvg, as in its paper",
    "eval_clients": "intermediate evaluations on a sample; the last one on all",
    "cohort_size": "with DP: the Poisson bucket, sized by sampling.poisson_bucket",
    "dp.clip_norm": "the starting clip; adaptive clipping moves it",
}


def get_config(epsilon: str = "4") -> ml_collections.ConfigDict:
    """The DP study at target ``epsilon`` (``"none"``: without DP)."""
    c = base.get_config()
    c.name = f"dp_eps_{epsilon}"
    c.settings = ("fashion_mnist_feature_shift",)
    c.algorithms = ("fedbn", "silobn", "fedavg", "fixbn", "fedavg_group")
    c.seeds = (0,)
    c.rounds = 10  # sized for a shared 2-core CPU (docs/privacy.md)
    c.fix_round = 5  # FixBN: half of the rounds explore as FedAvg, as in its paper
    c.eval_every = 10  # round 1 and the last
    c.eval_clients = 100  # intermediate evaluations on a sample; the last one on all
    c.batch_size = 10
    c.local_epochs = 1
    c.executor = "auto"
    c.checkpoint_every = 10
    c.data.name = "fashion_mnist"
    c.data.num_clients = NUM_CLIENTS
    c.data.max_train = 15000
    c.data.max_test = 2500
    c.model.name = "seed_cnn"
    c.model.widths = (16, 32)
    c.model.hidden = 32
    c.optim.name = "sgd"
    c.optim.lr = 0.05
    c.optim.weight_decay = 0.0
    c.eval_batch_size = 1000
    c.monitor.probe_size = 8  # the BN monitor runs every round: kept cheap
    c.cohort_size = EXPECTED_COHORT
    if epsilon == "none":
        return c
    c.cohort_size = 0
    c.dp.enabled = True
    c.dp.q = EXPECTED_COHORT / NUM_CLIENTS
    c.dp.target_epsilon = float(epsilon)
    c.dp.delta = 1.0 / NUM_CLIENTS
    c.dp.clip_norm = 1.0
    c.dp.target_quantile = 0.5
    c.dp.clip_learning_rate = 0.2
    c.dp.accountant = "rdp"
    return c
