"""fedjax_bn: functional JAX federated learning for models with BatchNorm, done right."""

from fedjax_bn.aggregate import pool_batch_stats, pooled_moments, weighted_mean
from fedjax_bn.algorithms import (
    Algorithm,
    ServerState,
    fedavg,
    fedbn,
    fedbn_prox,
    fedprox,
    make_algorithm,
    silobn,
)
from fedjax_bn.client import LocalTraining, client_update, train_step
from fedjax_bn.evaluate import (
    evaluate_clients,
    evaluate_global,
    evaluate_model,
    global_variables,
)
from fedjax_bn.execute import make_round
from fedjax_bn.models import DigitModel, SeedCNN
from fedjax_bn.tree import bn_param_mask, merge, partition

__all__ = [
    "Algorithm",
    "DigitModel",
    "LocalTraining",
    "SeedCNN",
    "ServerState",
    "bn_param_mask",
    "client_update",
    "evaluate_model",
    "evaluate_clients",
    "evaluate_global",
    "fedavg",
    "fedbn",
    "fedbn_prox",
    "fedprox",
    "global_variables",
    "make_algorithm",
    "make_round",
    "merge",
    "partition",
    "pool_batch_stats",
    "pooled_moments",
    "silobn",
    "train_step",
    "weighted_mean",
]
