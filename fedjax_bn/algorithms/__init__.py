"""Federated algorithms: one module per family, all built on the protocol in ``base.py``.

Adding an algorithm is one module here plus a line in ``experiments/registry.py``.
"""

from fedjax_bn.algorithms.base import (
    Algorithm,
    FedState,
    client_variables,
    init_variables,
    model_parts,
    personal_variables,
    task_of,
)
from fedjax_bn.algorithms.batch_stats_only import fedavg_batch_stats_only
from fedjax_bn.algorithms.ditto import ditto
from fedjax_bn.algorithms.fedavg import (
    ClientState,
    Message,
    ServerState,
    fedavg,
    fedbn,
    fedbn_prox,
    fedprox,
    make_algorithm,
    server_step,
    silobn,
)
from fedjax_bn.algorithms.fednova import fednova
from fedjax_bn.algorithms.fedopt import fedadagrad, fedadam, fedavgm, fedyogi
from fedjax_bn.algorithms.fedrep import fedper, fedrep, lg_fedavg
from fedjax_bn.algorithms.fixbn import fixbn
from fedjax_bn.algorithms.scaffold import scaffold

__all__ = [
    "Algorithm",
    "ClientState",
    "FedState",
    "Message",
    "ServerState",
    "client_variables",
    "ditto",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavg_batch_stats_only",
    "fedavgm",
    "fedbn",
    "fedbn_prox",
    "fednova",
    "fedper",
    "fedrep",
    "fedprox",
    "fedyogi",
    "fixbn",
    "init_variables",
    "lg_fedavg",
    "personal_variables",
    "task_of",
    "make_algorithm",
    "model_parts",
    "scaffold",
    "server_step",
    "silobn",
]
