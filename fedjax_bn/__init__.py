"""fedjax_bn: functional JAX federated learning for models with BatchNorm, done right."""

from fedjax_bn import aggregators, budgets, privacy, robust, sampling
from fedjax_bn.adapt import adapt_bn
from fedjax_bn.aggregate import pooled_moments, weighted_mean
from fedjax_bn.algorithms import (
    Algorithm,
    FedState,
    ServerState,
    ditto,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedbn,
    fedbn_prox,
    fednova,
    fedper,
    fedprox,
    fedrep,
    fedyogi,
    fixbn,
    lg_fedavg,
    make_algorithm,
    scaffold,
    silobn,
)
from fedjax_bn.cache import disable_compilation_cache, enable_compilation_cache
from fedjax_bn.client import Batch, LocalTraining, train_step
from fedjax_bn.evaluate import (
    evaluate_clients,
    evaluate_global,
    evaluate_model,
    global_variables,
)
from fedjax_bn.execution import RoundOptions, RoundResult, client_update, make_round
from fedjax_bn.models import DigitModel, SeedCNN
from fedjax_bn.policy import AllBut, bn_param_mask, merge, partition, pool_batch_stats
from fedjax_bn.resnet import ResNet, ResNet18
from fedjax_bn.runs import stack_runs, unstack_run, vmap_runs
from fedjax_bn.task import Task, make_task


def __getattr__(name: str):  # NnxCNN loads flax.nnx only when asked for
    if name == "NnxCNN":
        from fedjax_bn.nnx_cnn import NnxCNN

        return NnxCNN
    raise AttributeError(f"module 'fedjax_bn' has no attribute {name!r}")


__all__ = [
    "aggregators",
    "budgets",
    "privacy",
    "robust",
    "sampling",
    "AllBut",
    "Algorithm",
    "Batch",
    "DigitModel",
    "FedState",
    "LocalTraining",
    "NnxCNN",
    "ResNet",
    "ResNet18",
    "RoundOptions",
    "RoundResult",
    "SeedCNN",
    "Task",
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
    "ditto",
    "fednova",
    "fedper",
    "fedprox",
    "fedrep",
    "fedyogi",
    "fixbn",
    "global_variables",
    "lg_fedavg",
    "make_algorithm",
    "make_round",
    "make_task",
    "merge",
    "partition",
    "pool_batch_stats",
    "pooled_moments",
    "scaffold",
    "silobn",
    "stack_runs",
    "train_step",
    "unstack_run",
    "vmap_runs",
    "weighted_mean",
]
