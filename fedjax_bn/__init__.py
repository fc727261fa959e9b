"""fedjax_bn: functional JAX federated learning for models with BatchNorm, done right."""

from fedjax_bn.adapt import adapt_bn
from fedjax_bn.aggregate import pooled_moments, weighted_mean
from fedjax_bn.algorithms import (
    Algorithm,
    FedState,
    ServerState,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedbn,
    fedbn_prox,
    fednova,
    fedprox,
    fedyogi,
    fixbn,
    make_algorithm,
    scaffold,
    silobn,
)
from fedjax_bn.cache import disable_compilation_cache, enable_by_default, enable_compilation_cache
from fedjax_bn.client import Batch, LocalTraining, train_step
from fedjax_bn.evaluate import (
    evaluate_clients,
    evaluate_global,
    evaluate_model,
    global_variables,
)
from fedjax_bn.execution import client_update, make_round
from fedjax_bn.models import DigitModel, SeedCNN
from fedjax_bn.policy import bn_param_mask, merge, partition, pool_batch_stats

enable_by_default()  # jax's persistent compilation cache; FEDJAX_BN_COMPILATION_CACHE=0: off

__all__ = [
    "Algorithm",
    "Batch",
    "DigitModel",
    "FedState",
    "LocalTraining",
    "SeedCNN",
    "ServerState",
    "adapt_bn",
    "bn_param_mask",
    "disable_compilation_cache",
    "enable_compilation_cache",
    "client_update",
    "evaluate_clients",
    "evaluate_global",
    "evaluate_model",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedbn",
    "fedbn_prox",
    "fednova",
    "fedprox",
    "fedyogi",
    "fixbn",
    "global_variables",
    "make_algorithm",
    "make_round",
    "merge",
    "partition",
    "pool_batch_stats",
    "pooled_moments",
    "scaffold",
    "silobn",
    "train_step",
    "weighted_mean",
]
