"""The default experiment: a BatchNorm study on the embedded (offline) digits data set.

10 clients in two settings, Dirichlet(alpha=0.5) label skew and feature shift (each client its
own image domain), five algorithms: ``fedavg``, ``fedprox`` (mu=1e-3), ``fedbn``, ``silobn`` and
``fedprox_bn_eval`` (FedProx trained with BN in eval mode: the original bug, as an ablation).

Local optimizer: Adam lr 5e-4 with weight decay 1e-4 as *coupled* L2, like torch's
``Adam(weight_decay=)``: ``optax.chain(optax.add_decayed_weights(1e-4), optax.adam(5e-4))``
(the decay is added to the gradient before Adam's scaling; this is not AdamW). Batch 32, one
local epoch per round. ``rounds`` is chosen so the whole default finishes within 5 minutes on a
2-core CPU (README, runner section).

Every field can be overridden on the command line, e.g.
``python -m experiments.run --config.rounds=3 --config.seeds=0,1,2 --config.mu=0.01``.
"""

from __future__ import annotations

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The default digits BatchNorm study."""
    c = ml_collections.ConfigDict()
    c.name = "digits_bn"  # names the default output directory
    # Registry names (experiments/registry.py); a comma-separated string works too.
    c.settings = ("digits_label_skew", "digits_feature_shift")
    # Algorithms compared on every setting, each run with every seed.
    c.algorithms = ("fedavg", "fedprox", "fedbn", "silobn", "fedprox_bn_eval")
    c.seeds = (0,)  # each seed derives separate init / partition / shuffling seeds
    c.rounds = 40  # federated rounds per run
    c.eval_every = 4  # rounds 1 and the last are always evaluated too
    c.batch_size = 32  # client training batch size
    c.local_epochs = 1  # passes over its data a client makes per round
    c.executor = "sequential"  # any executor fedjax_bn.make_round knows
    c.client_threads = 0  # sequential: host threads running clients at once; 0: 2 on a CPU, else 1
    c.mu = 1e-3  # FedProx proximal weight (fedprox, fedbn_prox, fedprox_bn_eval)
    c.clip_norm = 0.0  # clip each client's update of the shared params to this L2 norm; 0: off
    c.server_lr = 0.0  # fedavgm/fedadam/fedyogi/fedadagrad server lr; 0: the factory's default
    # fixbn: rounds < fix_round are FedAvg, later rounds train BN on the frozen global
    # statistics (half of the default 40 rounds, the paper's exploration/calibration split).
    c.fix_round = 20
    c.head = "Dense_1"  # fedper/fedrep/lg_fedavg: head modules (seed_cnn's classifier layer)
    c.head_steps = 2  # fedrep: local steps per round that train the head alone, body frozen
    c.ditto_lambda = 0.1  # ditto: proximal weight of the personal model towards the global one
    c.out_dir = ""  # empty: results/<name>-<timestamp>
    c.recalibrate = False  # evaluate fedavg-policy models after exact BN recalibration
    c.cohort_size = 0  # clients sampled per round (by `sampler`); 0: every client every round
    c.sampler = "uniform"  # cohort sampler: uniform | by_size | available (see availability)
    c.availability = 1.0  # sampler=available: each client's chance of being online in a round
    c.held_out = 0  # the partition's last this many clients never train; evaluated as newcomers
    c.eval_clients = 0  # clients evaluated at intermediate evaluations (a sample); 0: all
    c.adapt_bn = False  # also evaluate never-trained and held-out clients after AdaBN
    c.budget_min_steps = 0  # stragglers: local steps drawn per client and round from
    c.budget_max_steps = 0  # [budget_min_steps, budget_max_steps]; 0: no budget
    c.checkpoint_every = 5  # save the run state (orbax) every this many rounds, and at the end
    c.keep_checkpoints = 2  # how many of a run's latest checkpoints are kept
    c.progress = True  # tqdm bar per run
    c.tensorboard = True  # TensorBoard events in <out_dir>/tensorboard (tensorboardX)
    # jax's persistent compilation cache: runs sharing programs (and every later invocation)
    # skip most of the first round's compilation. Empty: disabled.
    c.compilation_cache = "~/.cache/fedjax_bn/jax"
    c.augment = ""  # training-batch augment: "" (none) | crop | flip | cifar (pad-4 crop + flip)
    c.loss = "cross_entropy"  # cross_entropy | label_smoothing (config.label_smoothing)
    c.label_smoothing = 0.1  # label_smoothing loss: mass spread uniformly over all classes

    c.data = ml_collections.ConfigDict()
    c.data.num_clients = 10  # clients the data is split among
    c.data.alpha = 0.5  # Dirichlet concentration of label-skew settings
    c.data.min_size = 10  # fewest train examples per client under label skew
    c.data.name = "digits"  # data set name, for sources that hold several (tfds)
    c.data.data_dir = ""  # where a downloading source caches its files; empty: its default
    c.data.max_train = 0  # tfds sources: keep this many train examples (0: all)
    c.data.max_test = 0  # tfds sources: keep this many test examples (0: all)

    c.model = ml_collections.ConfigDict()
    c.model.name = "seed_cnn"  # seed_cnn | digit_model | resnet18 | nnx_cnn
    c.model.widths = (32, 64)  # seed_cnn: conv+BN+ReLU block widths
    c.model.hidden = 128  # seed_cnn: first FC layer width
    c.model.conv_widths = (64, 64, 128)  # digit_model
    c.model.fc_widths = (2048, 512)  # digit_model
    c.model.num_filters = 64  # resnet18: width of the first stage
    c.model.dropout = 0.25  # nnx_cnn: dropout rate before the classifier
    c.model.momentum = 0.9  # BN running-statistics momentum
    # Normalization layers: batch (BatchNorm, the default) | group (GroupNorm, min(32, C)
    # groups) | layer (LayerNorm) | none (no norm, weight-standardized convs, as FedWon).
    c.model.norm = "batch"

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"  # adam | sgd
    c.optim.lr = 5e-4  # client learning rate
    c.optim.weight_decay = 1e-4  # coupled L2 (added to the gradient), as torch's Adam does
    c.optim.momentum = 0.0  # sgd only

    c.monitor = ml_collections.ConfigDict()
    c.monitor.probe_size = 64  # examples per client in the fixed probe batch

    c.eval_batch_size = 256  # batch size of evaluation only

    # DP-FedAvg (fedjax_bn.privacy, docs/privacy.md), for every algorithm of the run.
    c.dp = ml_collections.ConfigDict()
    c.dp.enabled = False  # True: every algorithm of the run trains with DP-FedAvg
    c.dp.noise_multiplier = 1.0  # z: noise std z * clip on the sum of clipped updates
    c.dp.clip_norm = 1.0  # L2 clip of each client's whole update (the start when adaptive)
    c.dp.target_epsilon = 0.0  # > 0: calibrate noise_multiplier to it for config.rounds
    c.dp.delta = 0.0  # 0: 1 / (number of training clients)
    c.dp.q = 0.0  # > 0: Poisson sampling at this rate (cohort_size: the bucket, 0: auto)
    c.dp.target_quantile = 0.0  # > 0: adaptive clipping toward this quantile of update norms
    c.dp.clip_learning_rate = 0.2  # adaptive clipping's geometric step
    c.dp.accountant = "rdp"  # rdp | pld (dp_accounting)

    # Robust aggregators (fedjax_bn.robust) of the fedavg_<rule> algorithms (registry.py).
    c.aggregator = ml_collections.ConfigDict()
    c.aggregator.beta = 0.2  # trimmed_mean: share trimmed from each end, in [0, 0.5)
    c.aggregator.f = 0  # krum, multi_krum: clients assumed Byzantine; 0: the attackers' count
    c.aggregator.max_norm = 1.0  # norm_bound: each update's L2 norm is cut to this

    # Byzantine clients (experiments/attacks.py), the same ones for every algorithm of a seed.
    c.attack = ml_collections.ConfigDict()
    c.attack.kind = "none"  # none | sign_flip | scale | gaussian | label_flip
    c.attack.fraction = 0.2  # share of the training clients that attack, in [0, 1)
    c.attack.scale = 10.0  # scale: update multiplier; gaussian: noise std (> 0)
    return c
