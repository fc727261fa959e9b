"""The ClientApp as the Flower PyTorch quickstart writes one: load the global arrays, train
one local epoch, send the state_dict back with the number of examples."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from torch_app.task import load_data, model, train_epoch

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    torch.set_num_threads(int(cfg["threads"]))
    net = model()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(context.node_config)
    seed = int(cfg["seed"]) * 1000 + int(msg.content["config"]["server-round"])
    train_epoch(net, x, y, int(cfg["batch-size"]), seed)
    content = RecordDict(
        {"arrays": ArrayRecord(net.state_dict()), "metrics": MetricRecord({"num-examples": len(y)})}
    )
    return Message(content=content, reply_to=msg)
