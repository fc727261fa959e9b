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

# What each field means; `python -m experiments.run --help` prints it beside the chosen
# config's values. Every field get_config sets has an entry (tests/test_runner.py).
HELP: dict[str, str] = {
    "name": "names the default output directory",
    "settings": "registry names (experiments/registry.py); a comma-separated string works too",
    "algorithms": "compared on every setting, each run with every seed (registry names)",
    "seeds": "each seed derives separate init / partition / shuffling seeds",
    "rounds": "federated rounds per run",
    "eval_every": "rounds 1 and the last are always evaluated too",
    "batch_size": "client training batch size",
    "local_epochs": "passes over its data a client makes per round",
    "executor": "any executor fedjax_bn.make_round knows",
    "client_threads": "sequential: host threads running clients at once; 0: 2 on a CPU, else 1",
    "mu": "FedProx proximal weight (fedprox, fedbn_prox, fedprox_bn_eval)",
    "clip_norm": "clip each client's update of the shared params to this L2 norm; 0: off",
    "server_lr": "fedavgm/fedadam/fedyogi/fedadagrad server lr; 0: the factory's default",
    "fix_round": "fixbn: rounds < fix_round are FedAvg, later rounds train BN on the frozen "
    "global statistics (half of the default 40 rounds, the paper's exploration/calibration split)",
    "head": "fedper/fedrep/lg_fedavg: head modules (seed_cnn's classifier layer)",
    "head_steps": "fedrep: local steps per round that train the head alone, body frozen",
    "ditto_lambda": "ditto: proximal weight of the personal model towards the global one",
    "out_dir": "empty: results/<name>-<timestamp>",
    "recalibrate": "evaluate fedavg-policy models after exact BN recalibration",
    "cohort_size": "clients sampled per round (by `sampler`); 0: every client every round",
    "sampler": "cohort sampler: uniform | by_size | available (see availability)",
    "availability": "sampler=available: each client's chance of being online in a round",
    "held_out": "the partition's last this many clients never train; evaluated as newcomers",
    "eval_clients": "clients evaluated at intermediate evaluations (a sample); 0: all",
    "adapt_bn": "also evaluate never-trained and held-out clients after AdaBN",
    "budget_min_steps": "stragglers: local steps drawn per client and round from "
    "[budget_min_steps, budget_max_steps]",
    "budget_max_steps": "see budget_min_steps; 0: no budget",
    "parallel_runs": "seeds of one setting and algorithm trained as one batched federation "
    "(fb.vmap_runs), this many at a time; 1: one run at a time; no cohorts, DP or budgets with > 1",
    "checkpoint_every": "save the run state (orbax) every this many rounds, and at the end",
    "keep_checkpoints": "how many of a run's latest checkpoints are kept",
    "progress": "tqdm bar per run",
    "tensorboard": "TensorBoard events in <out_dir>/tensorboard (tensorboardX)",
    "compilation_cache": "jax's persistent compilation cache: runs sharing programs (and every "
    "later invocation) skip most of the first round's compilation; empty: disabled",
    "augment": 'training-batch augment: "" (none) | crop | flip | cifar (pad-4 crop + flip)',
    "loss": "cross_entropy | label_smoothing (config.label_smoothing)",
    "label_smoothing": "label_smoothing loss: mass spread uniformly over all classes",
    "data.num_clients": "clients the data is split among",
    "data.alpha": "Dirichlet concentration of label-skew settings",
    "data.min_size": "fewest train examples per client under label skew",
    "data.name": "data set name, for sources that hold several (tfds)",
    "data.data_dir": "where a downloading source caches its files; empty: its default",
    "data.max_train": "tfds sources: keep this many train examples (0: all)",
    "data.max_test": "tfds sources: keep this many test examples (0: all)",
    "model.name": "seed_cnn | digit_model | resnet18 | nnx_cnn",
    "model.widths": "seed_cnn: conv+BN+ReLU block widths",
    "model.hidden": "seed_cnn: first FC layer width",
    "model.conv_widths": "digit_model: conv block widths",
    "model.fc_widths": "digit_model: FC layer widths",
    "model.num_filters": "resnet18: width of the first stage",
    "model.dropout": "nnx_cnn: dropout rate before the classifier",
    "model.momentum": "BN running-statistics momentum",
    "model.norm": "normalization layers: batch (BatchNorm, the default) | group (GroupNorm, "
    "min(32, C) groups) | layer (LayerNorm) | none (no norm, weight-standardized convs, as FedWon)",
    "optim.name": "adam | sgd",
    "optim.lr": "client learning rate",
    "optim.weight_decay": "coupled L2 (added to the gradient), as torch's Adam does",
    "optim.momentum": "sgd only",
    "monitor.probe_size": "examples per client in the fixed probe batch",
    "eval_batch_size": "batch size of evaluation only",
    "dp.enabled": "True: every algorithm of the run trains with DP-FedAvg (fedjax_bn.privacy, "
    "docs/privacy.md)",
    "dp.noise_multiplier": "z: noise std z * clip on the sum of clipped updates",
    "dp.clip_norm": "L2 clip of each client's whole update (the start when adaptive)",
    "dp.target_epsilon": "> 0: calibrate noise_multiplier to it for rounds (config.json: the z)",
    "dp.delta": "0: 1 / (number of training clients)",
    "dp.q": "> 0: Poisson sampling at this rate (cohort_size: the bucket, 0: auto)",
    "dp.target_quantile": "> 0: adaptive clipping toward this quantile of update norms",
    "dp.clip_learning_rate": "adaptive clipping's geometric step",
    "dp.accountant": "rdp | pld (dp_accounting)",
    "sweep.optim.lr": "a grid in one process (experiments/sweep.py), every point its own run "
    "sharing the compiled programs: client learning rates, e.g. 1e-4,5e-4,1e-3; '': not swept",
    "sweep.optim.weight_decay": "client weight decays to sweep",
    "sweep.optim.momentum": "sgd momenta to sweep (each > 0; optim.momentum > 0)",
    "sweep.mu": "FedProx mu values to sweep (prox algorithms, config.mu > 0)",
    "sweep.clip_norm": "update clip norms to sweep (config.clip_norm > 0)",
    "sweep.server_lr": "server learning rates to sweep (server optimizers; each > 0)",
    "sweep.dp.noise_multiplier": "DP noise multipliers to sweep (fixed clip only)",
    "sweep.dp.clip_norm": "DP clip norms to sweep (dp.enabled)",
    "compress.spec": "compression of what clients send (docs/robust_and_compression.md), for "
    "every algorithm: q<bits> | top<k> | stc<k>, optionally ef_-prefixed; '': none; an "
    "algorithm named like fedavg+q4 gets its own spec instead",
    "compress.seed": "stochastic quantization's keys: fold_in(PRNGKey(seed), client)",
    "aggregator.beta": "trimmed_mean (fedavg_trimmed_mean): share trimmed from each end, "
    "in [0, 0.5)",
    "aggregator.f": "krum, multi_krum: clients assumed Byzantine; 0: the attackers' count",
    "aggregator.max_norm": "norm_bound: each update's L2 norm is cut to this",
    "attack.kind": "Byzantine clients (experiments/attacks.py), the same ones for every "
    "algorithm of a seed: none | sign_flip | scale | gaussian | label_flip",
    "attack.fraction": "share of the training clients that attack, in [0, 1)",
    "attack.scale": "scale: update multiplier; gaussian: noise std (> 0)",
}


def get_config() -> ml_collections.ConfigDict:
    """The default digits BatchNorm study."""
    c = ml_collections.ConfigDict()
    c.name = "digits_bn"
    c.settings = ("digits_label_skew", "digits_feature_shift")
    c.algorithms = ("fedavg", "fedprox", "fedbn", "silobn", "fedprox_bn_eval")
    c.seeds = (0,)
    c.rounds = 40
    c.eval_every = 4
    c.batch_size = 32
    c.local_epochs = 1
    c.executor = "sequential"
    c.client_threads = 0
    c.mu = 1e-3
    c.clip_norm = 0.0
    c.server_lr = 0.0
    c.fix_round = 20
    c.head = "Dense_1"
    c.head_steps = 2
    c.ditto_lambda = 0.1
    c.out_dir = ""
    c.recalibrate = False
    c.cohort_size = 0
    c.sampler = "uniform"
    c.availability = 1.0
    c.held_out = 0
    c.eval_clients = 0
    c.adapt_bn = False
    c.budget_min_steps = 0
    c.budget_max_steps = 0
    c.parallel_runs = 1
    c.checkpoint_every = 5
    c.keep_checkpoints = 2
    c.progress = True
    c.tensorboard = True
    c.compilation_cache = "~/.cache/fedjax_bn/jax"
    c.augment = ""
    c.loss = "cross_entropy"
    c.label_smoothing = 0.1

    c.data = ml_collections.ConfigDict()
    c.data.num_clients = 10
    c.data.alpha = 0.5
    c.data.min_size = 10
    c.data.name = "digits"
    c.data.data_dir = ""
    c.data.max_train = 0
    c.data.max_test = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "seed_cnn"
    c.model.widths = (32, 64)
    c.model.hidden = 128
    c.model.conv_widths = (64, 64, 128)
    c.model.fc_widths = (2048, 512)
    c.model.num_filters = 64
    c.model.dropout = 0.25
    c.model.momentum = 0.9
    c.model.norm = "batch"

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adam"
    c.optim.lr = 5e-4
    c.optim.weight_decay = 1e-4
    c.optim.momentum = 0.0

    c.monitor = ml_collections.ConfigDict()
    c.monitor.probe_size = 64

    c.eval_batch_size = 256

    # DP-FedAvg, for every algorithm of the run (what each field means: HELP).
    c.dp = ml_collections.ConfigDict()
    c.dp.enabled = False
    c.dp.noise_multiplier = 1.0
    c.dp.clip_norm = 1.0
    c.dp.target_epsilon = 0.0
    c.dp.delta = 0.0
    c.dp.q = 0.0
    c.dp.target_quantile = 0.0
    c.dp.clip_learning_rate = 0.2
    c.dp.accountant = "rdp"

    # A grid in one process (experiments/sweep.py); '' is not swept.
    c.sweep = ml_collections.ConfigDict()
    c.sweep.optim = ml_collections.ConfigDict()
    c.sweep.optim.lr = ""
    c.sweep.optim.weight_decay = ""
    c.sweep.optim.momentum = ""
    c.sweep.mu = ""
    c.sweep.clip_norm = ""
    c.sweep.server_lr = ""
    c.sweep.dp = ml_collections.ConfigDict()
    c.sweep.dp.noise_multiplier = ""
    c.sweep.dp.clip_norm = ""

    # Compression of what clients send (fedjax_bn.compress), for every algorithm.
    c.compress = ml_collections.ConfigDict()
    c.compress.spec = ""
    c.compress.seed = 0

    # Robust aggregators of the fedavg_<rule> algorithms (registry.py).
    c.aggregator = ml_collections.ConfigDict()
    c.aggregator.beta = 0.2
    c.aggregator.f = 0
    c.aggregator.max_norm = 1.0

    # Byzantine clients (experiments/attacks.py), the same ones for every algorithm of a seed.
    c.attack = ml_collections.ConfigDict()
    c.attack.kind = "none"
    c.attack.fraction = 0.2
    c.attack.scale = 10.0
    return c
