"""Cold cost of ``fedjax_bn.interop.from_torch`` on the peers' model, each in a fresh process.

    PYTHONPATH=. python benchmarks/from_torch_cost.py --repeats 5
    PYTHONPATH=/path/to/other/checkout python benchmarks/from_torch_cost.py  # another version

The model (the peer comparison's workload): SeedCNN 32/64 without pooling + FC 128 on 8x8x1
digits, 10 classes. The parent writes a torch-layout ``state_dict`` (``nn.Sequential`` keys,
random float32 arrays, BN running statistics and ``num_batches_tracked`` included) to an
``.npz``; each child imports fedjax_bn, loads it and times ``from_torch`` alone, counting the
XLA programs compiled meanwhile (``jax.monitoring``). No persistent compilation cache: every
child is cold. A benchmark, not a test: read the median over repeats on a quiet machine.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

WIDTHS, HIDDEN, CLASSES, SIDE = (32, 64), 128, 10, 8


def write_state_dict(path: Path) -> None:
    """torch's ``nn.Sequential`` SeedCNN (no pooling) as random arrays, keyed as torch keys it."""
    rng = np.random.default_rng(0)
    sd: dict[str, np.ndarray] = {}
    i, c_in = 0, 1
    for width in WIDTHS:  # conv, bn, relu
        sd[f"{i}.weight"] = rng.normal(size=(width, c_in, 3, 3)).astype(np.float32) * 0.1
        sd[f"{i}.bias"] = np.zeros(width, np.float32)
        bn = {"weight": np.ones(width), "bias": np.zeros(width)}
        bn |= {"running_mean": rng.normal(size=width), "running_var": np.ones(width)}
        sd |= {f"{i + 1}.{k}": v.astype(np.float32) for k, v in bn.items()}
        sd[f"{i + 1}.num_batches_tracked"] = np.array(0, np.int64)
        i, c_in = i + 3, width
    flat = c_in * SIDE * SIDE
    for n_in, n_out, j in ((flat, HIDDEN, i + 1), (HIDDEN, CLASSES, i + 3)):  # flatten, fc, relu
        sd[f"{j}.weight"] = rng.normal(size=(n_out, n_in)).astype(np.float32) * 0.01
        sd[f"{j}.bias"] = np.zeros(n_out, np.float32)
    np.savez(path, **sd)


def child(path: str) -> dict[str, Any]:
    """Import, then ``from_torch`` on the saved dict, timed and with its compile count."""
    import jax

    import fedjax_bn as fb
    from fedjax_bn.interop import from_torch

    t_import = time.perf_counter()
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, d, **_: (
            compiles.append(d) if event == "/jax/core/compile/backend_compile_duration" else None
        )
    )
    sd = dict(np.load(path))
    model = fb.SeedCNN(num_classes=CLASSES, widths=WIDTHS, hidden=HIDDEN, pool=False)
    t0 = time.perf_counter()
    variables = from_torch(model, sd, sample_x=np.zeros((1, SIDE, SIDE, 1), np.uint8))
    jax.block_until_ready(variables)
    t1 = time.perf_counter()
    return {
        "import_s": t_import - START,
        "from_torch_s": t1 - t0,
        "programs": len(compiles),
        "compile_s": sum(compiles),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "state_dict.npz"
        write_state_dict(path)
        cmd = [sys.executable, __file__, "--child", str(path)]  # fedjax_bn from PYTHONPATH
        outputs = [subprocess.check_output(cmd) for _ in range(args.repeats)]
    rows = [json.loads(o.splitlines()[-1]) for o in outputs]
    for name in ("import_s", "from_torch_s", "programs", "compile_s"):
        values = [r[name] for r in rows]
        print(
            f"{name}: median {statistics.median(values):.3g} "
            f"(min {min(values):.3g}, max {max(values):.3g}) over {len(values)} processes"
        )


if __name__ == "__main__":
    main()
