"""What both sides build from the run config: the same Algorithm object, and a node's data."""

from __future__ import annotations

from typing import Any

import numpy as np
import optax

import fedjax_bn as fb
from fedjax_bn.data import load_digits

ALGORITHMS = ("fedavg", "fedbn", "fedbn_prox", "scaffold")


def model_and_optimizer(config: Any) -> tuple[fb.SeedCNN, optax.GradientTransformation]:
    """``model = "small"``: SeedCNN 8 + FC 32, SGD at ``lr``; ``"reference"``: SeedCNN 32/64 +
    FC 128 with Adam 5e-4 and coupled weight decay 1e-4, the torch baseline's model and
    optimizer (``benchmarks/torch_reference.py``, ``benchmarks/flower_torch_app``)."""
    kind, lr = str(config.get("model", "small")), float(config["lr"])
    if kind == "small":
        return fb.SeedCNN(num_classes=10, widths=(8,), hidden=32), optax.sgd(lr)
    if kind == "reference":
        model = fb.SeedCNN(num_classes=10, widths=(32, 64), hidden=128)
        return model, optax.chain(optax.add_decayed_weights(1e-4), optax.adam(5e-4))
    raise ValueError(f"unknown model {kind!r}; pick small or reference.")


def algorithm(config: Any) -> fb.Algorithm:
    """The run's algorithm on 8x8 digits, from ``run_config``."""
    model, tx = model_and_optimizer(config)
    name, lr = str(config["algorithm"]), float(config["lr"])
    if name == "fedavg":
        return fb.fedavg(model, tx)
    if name == "fedbn":
        return fb.fedbn(model, tx)
    if name == "fedbn_prox":
        return fb.fedbn_prox(
            model, optax.sgd(lr, momentum=0.9), mu=0.01, persist_client_optimizer=True
        )
    if name == "scaffold":
        return fb.scaffold(model, optax.sgd(lr), lr=lr)
    raise ValueError(f"unknown algorithm {name!r}; pick one of {ALGORITHMS}.")


def sample_x() -> np.ndarray:
    """One input example's shape and dtype, for the server's ``init``."""
    return np.zeros((1, 8, 8, 1), np.float32)


def load_data(node_config: Any, run_config: Any) -> tuple[np.ndarray, np.ndarray]:
    """This node's training examples: the ``.npz`` (arrays ``x``, ``y``) at its node config's
    ``data-path``, else partition ``partition-id`` of ``num-partitions`` of the digits."""
    if "data-path" in node_config:
        with np.load(str(node_config["data-path"])) as data:
            x, y = data["x"], data["y"]
    else:
        x_train, y_train, _, _ = load_digits(seed=0)
        part = int(node_config["partition-id"])
        parts = int(node_config["num-partitions"])
        x, y = np.array_split(x_train, parts)[part], np.array_split(y_train, parts)[part]
    limit = int(run_config["examples-per-client"])
    return (x[:limit], y[:limit]) if limit > 0 else (x, y)
