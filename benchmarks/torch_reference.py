"""The PyTorch side of ``benchmarks/startup.py``: a plain torch loop on the same workload.

Runs in an environment of its own (torch is not a project dependency; it imports neither jax
nor fedjax_bn), e.g.::

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py steps --cases '[["m", [8, 8, 1],
        [32, 64], 128, 10]]'
    /tmp/torchvenv/bin/python benchmarks/torch_reference.py workload --data W.npz --rounds 30

``steps`` times one plain train step (forward, cross-entropy, backward, Adam with coupled
weight decay) of the given models (``benchmarks/plain_steps.py``'s ``STEP_CASES``, timed in JAX
there).
``workload`` is a whole federated run as a torch user writes it: FedAvg over the clients of
``W.npz`` (written by ``startup.py``: the very clients and test set the JAX run uses), one
local epoch of batches of 32 per client per round, BN buffers averaged, then the test accuracy.
``init`` writes the workload's initial state dict as ``.npz`` (``--no-pool``: the peers'
model), which ``workload --init`` and the JAX side (``fedjax_bn.interop.from_torch``) start
from. It prints one JSON line; ``startup.py`` measures the process's wall time from outside.
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch
from torch import nn


def seed_cnn(
    in_shape: tuple[int, int, int], widths, hidden: int, classes: int, pool: bool = True
) -> nn.Module:
    """SeedCNN in torch: conv3x3 + BN + ReLU (+ 2x2 max-pool, ceil mode = flax's SAME pooling)
    blocks, then FC ``hidden`` + ReLU and the classifier."""
    h, w, c = in_shape
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(c, width, 3, padding=1),
            nn.BatchNorm2d(width, momentum=0.1),  # = flax momentum 0.9
            nn.ReLU(),
        ]
        c = width
        if pool:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            h, w = -(-h // 2), -(-w // 2)
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, classes)]
    return nn.Sequential(*layers)


def images(x: np.ndarray) -> torch.Tensor:
    """NHWC arrays as NCHW float tensors; uint8 scaled to [0, 1] (fedjax_bn's rule)."""
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    return t / 255.0 if x.dtype == np.uint8 else t


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """Adam 5e-4 with coupled L2 weight decay 1e-4, the bug report's optimizer."""
    return torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=1e-4)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
    """One plain train step."""
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss


def time_steps(cases: list, repeats: int, steps: int, batch: int) -> list[dict]:
    """Per case ``(name, (H, W, C), widths, hidden, classes)``: the fastest and the median of
    ``repeats`` bursts of ``steps`` steps."""
    rows = []
    for name, shape, widths, hidden, classes in cases:
        torch.manual_seed(0)
        model = seed_cnn(shape, widths, hidden, classes).train()
        opt = optimizer(model)
        x = torch.rand(batch, shape[2], shape[0], shape[1])
        y = torch.randint(0, classes, (batch,))
        for _ in range(5):
            train_step(model, opt, x, y)
        bursts = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(steps):
                train_step(model, opt, x, y)
            bursts.append((time.perf_counter() - start) / steps)
        rows.append({"case": name, "min_s": min(bursts), "median_s": float(np.median(bursts))})
    return rows


def initial_model(path: str, seed: int, pool: bool) -> nn.Module:
    """The global model of ``fedavg_workload`` before its first round (torch's own init)."""
    data = np.load(path)
    torch.manual_seed(seed)
    shape = tuple(int(s) for s in data["x0"].shape[1:])
    return seed_cnn(shape, (32, 64), 128, int(data["num_classes"]), pool)


def fedavg_workload(
    path: str, rounds: int, batch: int, seed: int, pool: bool = True, init: str = ""
) -> dict:
    """FedAvg over the clients in ``path``; every float parameter and BN buffer averaged by
    client size (``num_batches_tracked`` kept from the first client, as its dtype is int).
    ``init``: an ``.npz`` state dict to start from (``init`` mode wrote it)."""
    data = np.load(path)
    num = int(data["num_clients"])
    xs = [images(data[f"x{c}"]) for c in range(num)]
    ys = [torch.from_numpy(data[f"y{c}"]).long() for c in range(num)]
    sizes = np.array([len(y) for y in ys], dtype=np.float64)
    weights = sizes / sizes.sum()
    glob = initial_model(path, seed, pool)
    if init:
        glob.load_state_dict({k: torch.from_numpy(v) for k, v in np.load(init).items()})
    gen = torch.Generator().manual_seed(seed)
    round_s = []
    for _ in range(rounds):
        start = time.perf_counter()
        states = []
        for c in range(num):
            local = copy.deepcopy(glob).train()
            opt = optimizer(local)
            order = torch.randperm(len(ys[c]), generator=gen)
            for i in range(0, len(order), batch):
                idx = order[i : i + batch]
                train_step(local, opt, xs[c][idx], ys[c][idx])
            states.append(local.state_dict())
        new = {}
        for k, v in states[0].items():
            if v.dtype.is_floating_point:
                new[k] = sum(w * s[k] for w, s in zip(weights, states, strict=True))
            else:
                new[k] = v
        glob.load_state_dict(new)
        round_s.append(time.perf_counter() - start)
    x_test = images(data["x_test"])
    with torch.no_grad():
        acc = (glob.eval()(x_test).argmax(1) == torch.from_numpy(data["y_test"])).float().mean()
    return {"round_s": round_s, "test_accuracy": float(acc)}


def main() -> None:
    """Parse the mode and print one JSON line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=("steps", "workload", "init"))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (2 cores)")
    p.add_argument("--data", help="workload: the .npz startup.py wrote")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5, help="steps: bursts per case")
    p.add_argument("--steps", type=int, default=20, help="steps: steps per burst")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", default="[]", help="steps: JSON list of plain_steps.py's STEP_CASES")
    p.add_argument("--no-pool", action="store_true", help="SeedCNN without max pooling")
    p.add_argument("--init", default="", help="workload: start from this .npz state dict")
    p.add_argument("--out", default="", help="init: write the initial state dict here (.npz)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    if a.mode == "steps":
        out = {"torch": torch.__version__, "threads": a.threads}
        out["steps"] = time_steps(json.loads(a.cases), a.repeats, a.steps, a.batch)
    elif not a.data:
        p.error(f"{a.mode} needs --data (the .npz written by benchmarks/startup.py)")
    elif a.mode == "init":
        if not a.out:
            p.error("init needs --out (where to write the state dict)")
        sd = initial_model(a.data, a.seed, not a.no_pool).state_dict()
        np.savez(a.out, **{k: v.numpy() for k, v in sd.items()})
        out = {"wrote": a.out, "tensors": len(sd)}
    else:
        out = fedavg_workload(a.data, a.rounds, a.batch, a.seed, not a.no_pool, a.init)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
