"""The ServerApp: Flower's own FedAvg strategy (every array averaged by example count), with
each round's seconds printed as the fedjax_bn example prints them."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from torch_app.task import model

app = ServerApp()


class TimedFedAvg(FedAvg):
    """FedAvg that prints the seconds since the previous round's aggregate."""

    last = time.perf_counter()

    def aggregate_train(self, server_round, replies):
        out = super().aggregate_train(server_round, replies)
        now = time.perf_counter()
        print(f"round {server_round}: seconds {now - TimedFedAvg.last:.2f}", flush=True)
        TimedFedAvg.last = now
        return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    torch.manual_seed(int(cfg["seed"]))
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2)
    TimedFedAvg.last = time.perf_counter()
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model().state_dict()),
        num_rounds=int(cfg["num-server-rounds"]),
    )
