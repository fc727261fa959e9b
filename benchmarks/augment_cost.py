"""Cost of on-device augmentation relative to a train step (SeedCNN, 32x32x3 uint8, batch 32).

Times the library's train step (``fedjax_bn.client.train_step``, adam(5e-4), a full batch with
its step key) jitted without augmentation and with ``augment=cifar_standard()``, which runs
inside the same jitted step, interleaved back to back (bursts of
``--steps`` steps, ``--repeats`` bursts each, after warm-up), plus the augmentation alone.
Reports per-step best and median seconds and ``overhead = augmented / plain - 1`` (on best).

    python benchmarks/augment_cost.py [--repeats 7] [--steps 20] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fedjax_bn as fb
from fedjax_bn.client import Batch, LocalTraining, init_state
from fedjax_bn.data.augment import cifar_standard


def make_steps(model: Any, tx: optax.GradientTransformation) -> tuple[Callable, Callable]:
    """The library's own jitted train step (``fedjax_bn.client.train_step``) on a full batch,
    without and with ``augment=cifar_standard()``: ``(state, x, y, key) -> state``."""

    def step(task: fb.Task) -> Callable:
        spec = LocalTraining(model=task, tx=tx)
        return jax.jit(
            lambda state, x, y, key: fb.train_step(spec, None, state, Batch(x, y, None, key))
        )

    plain = step(fb.make_task(model))
    augmented = step(fb.make_task(model, augment=cifar_standard()))
    return plain, augmented


def burst(run: Callable[[int], Any], steps: int) -> float:
    """Seconds per step over ``steps`` calls of ``run(i)``, blocking on the last result."""
    start = time.perf_counter()
    out = None
    for i in range(steps):
        out = run(i)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps


def summary(times: list[float]) -> dict[str, float]:
    return {"best_s": min(times), "median_s": statistics.median(times)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="bursts per variant")
    parser.add_argument("--steps", type=int, default=20, help="steps per burst")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the JSON result here")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8))
    y = jnp.asarray(rng.integers(0, 100, (args.batch,), dtype=np.int32))
    model = fb.SeedCNN(num_classes=100)
    variables = model.init(jax.random.key(0), x[:1], train=False)
    tx = optax.adam(5e-4)
    plain, augmented = make_steps(model, tx)
    start = init_state(LocalTraining(model=model, tx=tx), dict(variables))
    augment_only = jax.jit(cifar_standard())
    keys = list(jax.random.split(jax.random.key(1), args.steps))

    state = {"plain": start, "aug": start}

    def run_plain(i: int):
        state["plain"] = plain(state["plain"], x, y, keys[i])
        return state["plain"]

    def run_aug(i: int):
        state["aug"] = augmented(state["aug"], x, y, keys[i])
        return state["aug"]

    def run_augment_only(i: int):
        return augment_only(keys[i], x)

    runs = {"plain": run_plain, "augmented": run_aug, "augment_only": run_augment_only}
    for run in runs.values():  # compile and warm up
        burst(run, max(2, args.steps // 4))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(burst(run, args.steps))

    result: dict[str, Any] = {name: summary(ts) for name, ts in times.items()}
    best_plain = result["plain"]["best_s"]
    result["overhead"] = result["augmented"]["best_s"] / best_plain - 1
    result["overhead_median"] = result["augmented"]["median_s"] / result["plain"]["median_s"] - 1
    result["augment_only_fraction"] = result["augment_only"]["best_s"] / best_plain
    result["config"] = {
        "batch": args.batch,
        "image": [32, 32, 3],
        "dtype": "uint8",
        "model": "SeedCNN(num_classes=100)",
        "steps": args.steps,
        "repeats": args.repeats,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
