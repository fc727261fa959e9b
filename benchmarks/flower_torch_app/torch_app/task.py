"""The model, optimizer and data of the torch baseline (no jax, no fedjax_bn imported)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# benchmarks/torch_reference.py's model and optimizer (the repository on the nodes' PYTHONPATH)
from benchmarks.torch_reference import optimizer, seed_cnn, train_step

__all__ = ["load_data", "model", "optimizer", "train_epoch"]


def model() -> torch.nn.Module:
    """SeedCNN 32/64 + FC 128 on 8x8x1 digits, 10 classes."""
    return seed_cnn((8, 8, 1), (32, 64), 128, 10)


def load_data(node_config: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The node's examples: the ``.npz`` (``x`` NHWC float, ``y``) at ``data-path``."""
    with np.load(str(node_config["data-path"])) as data:
        x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float()
        return x, torch.from_numpy(data["y"]).long()


def train_epoch(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
    """One local epoch of shuffled batches (a fresh optimizer, as torch_reference's FedAvg)."""
    net.train()
    opt = optimizer(net)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        train_step(net, opt, x[idx], y[idx])
