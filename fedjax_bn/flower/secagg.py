"""Secure aggregation (Flower's SecAgg+) for algorithms whose server needs only the clients'
weighted mean.

Flower 1.42 ships SecAgg+ for its legacy API only: ``SecAggPlusWorkflow`` runs inside a
``DefaultWorkflow`` on a ``LegacyContext`` holding a legacy ``Strategy``, and
``secaggplus_mod`` masks the ``parameters`` of the ClientApp's legacy ``FitRes``. The server
then learns the example-weighted **mean** of the clients' arrays (weights quantized as
``round(n / max_weight * quantization_range)``), never one client's arrays. So this path
carries exactly the algorithms whose ``server_update`` reads the messages only through that
mean: FedAvg / FedProx / FedBN / SiloBN with ``bn_stats="mean"`` (``fedopt``'s server
optimizers step the same mean; FedBN is what the tests run); the server folds the mean as a
one-client cohort of weight 1 (``server_update(server, mean[None], [1])``, exactly the
weighted mean's fold). Not carried:
pooled BN statistics (they need sums of ``var + mean^2``), SCAFFOLD, FedNova, clipping, robust
aggregators and quarantine (the server never sees a client's message to drop it). A message
with a non-float leaf is refused (SecAgg+ would quantize it as a float).

The client side runs the library's own round (:class:`~fedjax_bn.flower.client.ClientRunner`,
the same :class:`~fedjax_bn.flower.client.Layout` as the plain path, from a size query), its
row kept in ``Context.state``; a client with step budget 0 reports 0 examples.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedjax_bn.algorithms.base import Algorithm
from fedjax_bn.flower.client import (
    NO_BUDGET,
    STATE_KEY,
    ClientRunner,
    Layout,
    LoadData,
    size_reply,
)
from fedjax_bn.flower.records import decode, encode, from_record, leaf_paths, to_record
from fedjax_bn.flower.server import ServerRunner, query_sizes, round_key


def to_parameters(tree: Any) -> Parameters:
    """A pytree's leaves, in path order, as legacy ``Parameters``."""
    return ndarrays_to_parameters([encode(leaf) for _, leaf in leaf_paths(tree)])


def from_arrays(arrays: list[np.ndarray], template: Any, what: str, cast: bool = False) -> Any:
    """``arrays`` (path order) as ``template``'s tree, checked; ``cast``: to its dtypes first
    (SecAgg+'s dequantized mean comes back as float64)."""
    paths = leaf_paths(template)
    if len(arrays) != len(paths):
        raise ValueError(f"{what}: {len(arrays)} arrays, the algorithm's tree has {len(paths)}.")
    if cast:
        arrays = [
            np.asarray(a).astype(leaf.dtype) for a, (_, leaf) in zip(arrays, paths, strict=True)
        ]
    leaves = [decode(a, leaf, p, what) for a, (p, leaf) in zip(arrays, paths, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(template), leaves)


class MeanFold(FedAvg):
    """Flower's legacy FedAvg as SecAgg+'s strategy: it sends the server state (and the
    starting client row) as ``parameters`` with each client's round record as config, and
    folds the securely aggregated mean with the algorithm's ``server_update``."""

    def __init__(self, runner: ServerRunner, seed: int, min_nodes: int) -> None:
        super().__init__(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=min_nodes,
            min_available_clients=min_nodes,
        )
        self.runner, self.seed = runner, seed
        msg_t = runner.templates[0]
        if any(not jnp.issubdtype(leaf.dtype, jnp.floating) for _, leaf in leaf_paths(msg_t)):
            raise ValueError(
                "SecAgg+ carries float leaves only; this algorithm's message has others."
            )

        def fold(server: Any, mean: Any) -> Any:
            one = jax.tree.map(lambda a: a[None], mean)
            return runner.alg.server_update(server, one, jnp.ones((1,), jnp.int32))

        self._fold = jax.jit(fold)

    def initialize_parameters(self, client_manager: Any) -> Parameters:
        return to_parameters((self.runner.server, self.runner.init_row))

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any):
        runner = self.runner
        key = round_key(self.seed, runner.round)
        budget_C = runner.draw_budget(key)
        n_max = max(n for _, n in runner.sizes.values())
        pairs = []
        for proxy, _ in super().configure_fit(server_round, parameters, client_manager):
            cid, _ = runner.sizes[proxy.node_id]
            config = {
                "round": runner.round,
                "key": np.asarray(jax.random.key_data(key)).tobytes(),
                "slot": cid,
                "num-slots": runner.num_clients,
                "n-max": n_max,
                "budget": NO_BUDGET if budget_C is None else int(budget_C[cid]),
            }
            pairs.append((proxy, FitIns(parameters, config)))
        return pairs

    def aggregate_fit(self, server_round: int, results: list, failures: list):
        if failures or not results:
            raise RuntimeError(f"SecAgg+ round {server_round}: {len(failures)} clients failed.")
        # SecAgg+ gives every result the same parameters: the weighted mean, dequantized.
        arrays = parameters_to_ndarrays(results[0][1].parameters)
        mean = from_arrays(arrays, self.runner.templates[0], "SecAgg+ mean", cast=True)
        self.runner.server = self._fold(self.runner.server, mean)
        self.runner.round += 1
        return to_parameters((self.runner.server, self.runner.init_row)), {}


def secagg_server_app(
    alg: Algorithm,
    sample_x: Any,
    *,
    num_clients: int,
    num_rounds: int,
    min_train_nodes: int,
    seed: int = 0,
    budget: Any = None,
    on_done: Callable[[Any, Context], None] | None = None,
    **secagg: Any,
) -> ServerApp:
    """A ServerApp running ``alg`` through ``SecAggPlusWorkflow`` (``secagg``: its keywords,
    e.g. ``num_shares``, ``reconstruction_threshold``, ``clipping_range``,
    ``quantization_range``, ``max_weight``); every round all ``min_train_nodes`` train."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        runner = ServerRunner(alg, jax.random.key(seed), sample_x, num_clients, budget)
        _, nodes = sample_nodes(grid, min_train_nodes, min_train_nodes)
        query_sizes(grid, runner, list(nodes), None)
        strategy = MeanFold(runner, seed, min_train_nodes)
        legacy = LegacyContext(context, ServerConfig(num_rounds=num_rounds), strategy)
        options = {"num_shares": min_train_nodes, "reconstruction_threshold": 2, **secagg}
        DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(**options))(grid, legacy)
        if on_done is not None:
            on_done(runner.server, context)

    return app


def secagg_train_reply(
    runner: ClientRunner, msg: Message, context: Context, load_data: LoadData
) -> Message:
    """One legacy fit message: the round as :func:`~fedjax_bn.flower.client.train_reply`
    runs it, replying with the message's leaves as a ``FitRes`` for ``secaggplus_mod``."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    x_N, y_N = jax.tree.map(jnp.asarray, load_data(context))
    n = int(jax.tree.leaves(y_N)[0].shape[0])
    server_t, row_t = runner.templates(x_N)
    arrays = parameters_to_ndarrays(fitins.parameters)
    server, init = from_arrays(arrays, (server_t, row_t), "server state")
    cfg = fitins.config
    budget = None if int(cfg["budget"]) == NO_BUDGET else int(cfg["budget"])
    layout = Layout(int(cfg["slot"]), int(cfg["num-slots"]), int(cfg["n-max"]), budget)
    key = jax.random.wrap_key_data(jnp.asarray(np.frombuffer(cfg["key"], np.uint32)))
    row = init
    if STATE_KEY in context.state:
        row = from_record(context.state[STATE_KEY], row_t, "this client's kept state")
    message, row, _ = runner.run(server, row, x_N, y_N, key, int(cfg["round"]), layout)
    context.state[STATE_KEY] = to_record(row)
    weight = 0 if budget == 0 else n
    fitres = FitRes(Status(Code.OK, ""), to_parameters(message), weight, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def secagg_client_app(
    alg: Algorithm, load_data: LoadData, *, batch_size: int, local_epochs: int = 1
) -> ClientApp:
    """A ClientApp for :func:`secagg_server_app`: ``secaggplus_mod`` masks its replies."""
    runner = ClientRunner(alg, batch_size=batch_size, local_epochs=local_epochs)
    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return secagg_train_reply(runner, msg, context, load_data)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return size_reply(msg, context, load_data)

    return app
