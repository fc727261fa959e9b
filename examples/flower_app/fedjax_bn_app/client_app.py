"""The ClientApp: the algorithm's client side on this node's own data, state kept here."""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedjax_bn.flower import ClientRunner, train_reply
from fedjax_bn_app.task import algorithm, load_data

app = ClientApp()


@functools.lru_cache(maxsize=4)
def runner(name: str, lr: float, batch_size: int, epochs: int) -> ClientRunner:
    """One runner (its jitted steps) per configuration, kept across rounds."""
    config = {"algorithm": name, "lr": lr}
    return ClientRunner(algorithm(config), batch_size=batch_size, local_epochs=epochs)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    run = runner(
        str(cfg["algorithm"]), float(cfg["lr"]), int(cfg["batch-size"]), int(cfg["local-epochs"])
    )
    return train_reply(run, msg, context, lambda ctx: load_data(ctx.node_config, cfg))
