"""The ServerApp: the algorithm's ``init`` and ``server_update`` over the SuperNodes."""

from __future__ import annotations

import time

import jax
import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

import fedjax_bn as fb
from fedjax_bn.flower import ServerRunner, run_server
from fedjax_bn.flower.records import leaf_paths
from fedjax_bn_app.task import algorithm, sample_x

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    if cfg.get("compilation-cache", False):
        fb.enable_compilation_cache()
    num_clients, steps = int(cfg["num-clients"]), int(cfg.get("local-steps", 0))
    budget = [steps] * num_clients if steps > 0 else None  # most local steps a round
    runner = ServerRunner(
        algorithm(cfg), jax.random.key(int(cfg["seed"])), sample_x(), num_clients, budget
    )

    last = [time.perf_counter()]

    def report(round_: int, server, metrics) -> None:
        now = time.perf_counter()
        seconds, last[0] = now - last[0], now
        print(
            f"round {round_}: clients {metrics['client_id'].tolist()} "
            f"loss {np.round(metrics['loss'], 4).tolist()} seconds {seconds:.2f}",
            flush=True,
        )

    server = run_server(
        grid,
        runner,
        num_rounds=int(cfg["num-server-rounds"]),
        seed=int(cfg["seed"]),
        fraction_train=float(cfg["fraction-train"]),
        min_train_nodes=int(cfg["min-train-nodes"]),
        on_round=report,
    )
    if cfg["result-path"]:
        np.savez(str(cfg["result-path"]), **{p: np.asarray(v) for p, v in leaf_paths(server)})
