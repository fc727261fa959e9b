"""The ClientApp: the algorithm's client side on this node's own data, state kept here."""

from __future__ import annotations

import functools

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

import fedjax_bn as fb
from fedjax_bn.flower import ClientRunner, size_reply, train_reply
from fedjax_bn_app.task import algorithm, load_data

app = ClientApp()


@functools.lru_cache(maxsize=4)
def runner(name: str, model: str, lr: float, batch_size: int, epochs: int) -> ClientRunner:
    """One runner (its jitted steps) per configuration, kept for as long as the process."""
    config = {"algorithm": name, "model": model, "lr": lr}
    return ClientRunner(algorithm(config), batch_size=batch_size, local_epochs=epochs)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    if cfg.get("compilation-cache", False):
        # Flower starts a fresh ClientApp process for every message: with jax's persistent
        # cache the round's programs compile in the first round only, later rounds load them.
        fb.enable_compilation_cache()
    run = runner(
        str(cfg["algorithm"]),
        str(cfg.get("model", "small")),
        float(cfg["lr"]),
        int(cfg["batch-size"]),
        int(cfg["local-epochs"]),
    )
    return train_reply(run, msg, context, lambda ctx: load_data(ctx.node_config, cfg))


@app.query()
def query(msg: Message, context: Context) -> Message:
    return size_reply(msg, context, lambda ctx: load_data(ctx.node_config, context.run_config))
