"""Count the XLA programs a short run compiles (a script, not a test; issue: compile less).

    FEDJAX_BN_COMPILATION_CACHE=0 python -m benchmarks.programs

Runs the digits workload (10 clients, SeedCNN 32/64 + FC 128, Adam + coupled L2, FedProx,
sequential executor): init, two rounds, a global and a per-client evaluation, with
``jax_log_compiles`` on, and prints the number of programs compiled and the most frequent names.
"""

from __future__ import annotations

import collections
import io
import logging
import re

import jax
import optax

import fedjax_bn as fb
from fedjax_bn.data import digits_label_skew


def main() -> None:
    """Print how many programs the workload compiles, by name."""
    buf = io.StringIO()
    logging.getLogger("jax").addHandler(logging.StreamHandler(buf))
    logging.getLogger("jax").setLevel(logging.WARNING)
    jax.config.update("jax_log_compiles", True)
    data = digits_label_skew(10, 0.5, seed=0)
    model = fb.SeedCNN(num_classes=10, widths=(32, 64), hidden=128)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.adam(5e-4))
    alg = fb.fedprox(model, tx, 1e-3)
    state = alg.init(jax.random.key(0), data.train.sample_x(), data.num_clients)
    round_fn = fb.make_round(alg, executor="sequential")
    key = jax.random.key(1)
    for _ in range(2):
        key, round_key = jax.random.split(key)
        state, _ = round_fn(state, data.train, round_key)
    jax.block_until_ready(state)
    fb.evaluate_global(alg, state, data)
    fb.evaluate_clients(alg, state, data)
    names = re.findall(r"Compiling (\S+?) ", buf.getvalue())
    print(f"programs compiled: {len(names)}")
    for name, count in collections.Counter(names).most_common():
        print(f"  {count:3d}  {name}")


if __name__ == "__main__":
    main()
