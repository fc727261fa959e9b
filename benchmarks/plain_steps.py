"""The plain train step per image size, in this process: what ``startup.py --steps`` times.

    python -m benchmarks.plain_steps   # one JSON line: each case's fastest and median burst

One plain jitted step (forward, cross-entropy, backward, Adam with coupled weight decay) of
SeedCNNs at 8x8, 28x28 and 32x32, batch 32, and the step with two independent steps in flight
from two host threads (the sequential executor's two client lanes: per-step time of the pair).
``benchmarks/torch_reference.py steps`` times the same cases in torch; ``startup.py --steps``
runs both and tabulates. A benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import functools
import json
import statistics
from typing import Any

XNNPACK = "--xla_cpu_use_xnnpack=true"
# (name, (H, W, C), widths, hidden, classes): the plain steps timed in JAX and in torch.
STEP_CASES = (
    ("digits 8x8x1, 32/64, fc128", (8, 8, 1), (32, 64), 128, 10),
    ("fmnist 28x28x1, 32/64, fc128", (28, 28, 1), (32, 64), 128, 10),
    ("28x28x1, 64/128/256, fc128", (28, 28, 1), (64, 128, 256), 128, 10),
    ("cifar 32x32x3, 32/64, fc128", (32, 32, 3), (32, 64), 128, 100),
    ("cifar 32x32x3, 64/128/256, fc256", (32, 32, 3), (64, 128, 256), 256, 100),
)


def step_child(batch: int, repeats: int, steps: int) -> list[dict[str, Any]]:
    """The plain jitted step of each of torch_reference's cases, in this process's flags."""
    import jax.numpy as jnp
    import numpy as np

    import fedjax_bn as fb
    from benchmarks.bench import model_and_tx, timed, yardstick
    from fedjax_bn.data import ClientArrays

    rows = []
    for name, shape, widths, hidden, classes in STEP_CASES:
        model = fb.SeedCNN(num_classes=classes, widths=widths, hidden=hidden)
        x = np.random.default_rng(0).integers(0, 256, (1, batch, *shape), dtype=np.uint8)
        y = np.zeros((1, batch), np.int32)
        train = ClientArrays(jnp.asarray(x), jnp.asarray(y), jnp.array([batch], jnp.int32))
        run = yardstick(model, model_and_tx()[1], train, batch)
        other = yardstick(model, model_and_tx()[1], train, batch)  # a second client's chain
        run(5), other(5)
        bursts = [timed(lambda run=run: run(steps)) / steps for _ in range(repeats)]
        pair = functools.partial(in_flight, run, other, steps)
        pairs = [timed(pair) / 2 / steps for _ in range(repeats)]
        rows.append(
            {
                "case": name,
                "min_s": min(bursts),
                "median_s": statistics.median(bursts),
                "pair_min_s": min(pairs),
            }
        )
    return rows


def in_flight(run: Any, other: Any, steps: int) -> Any:
    """``steps`` steps of each of two independent chains, one on a second host thread: what
    the sequential executor's two client lanes do (``client_threads=2``)."""
    import threading

    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(other(steps)))
    thread.start()
    mine = run(steps)
    thread.join()
    return mine, out


if __name__ == "__main__":
    print(json.dumps(step_child(32, 5, 20)))
