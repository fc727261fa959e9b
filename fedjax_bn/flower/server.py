"""The server side on Flower: ``init`` and ``server_update`` of any algorithm over a ``Grid``.

Each round samples a cohort of the connected nodes (``fraction_train`` of them, at least
``min_train_nodes``, with Flower's own ``sample_nodes``), sends each the server state and the
round's key (and, to a node it has not met yet, the algorithm's starting client row), and folds
the replies with the executors' own :func:`~fedjax_bn.execution.quarantine.aggregate_round`
(weights: the clients' example counts; a non-finite message is dropped). Clients' rows never
come back: the server holds no ``FedState.clients``. Nodes that sit a round out keep their
state on their side.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedjax_bn.algorithms.base import Algorithm, stage_at
from fedjax_bn.execution.quarantine import aggregate_round
from fedjax_bn.flower.records import from_record, stack_trees, to_record

OnRound = Callable[[int, Any, dict[str, np.ndarray]], None]  # (round, server, metrics)


def round_key(seed: int, round_: int) -> jax.Array:
    """Round ``round_``'s PRNG key: ``fold_in(key(seed), round_)`` (pass the same to an
    in-process ``make_round`` to reproduce a deployed run)."""
    return jax.random.fold_in(jax.random.key(seed), round_)


class ServerRunner:
    """The server's state and its jitted fold, for ``num_clients`` clients in all."""

    def __init__(self, alg: Algorithm, rng_or_variables: Any, sample_x: Any, num_clients: int):
        self.alg = alg
        # init with the population size: algorithms read it (SCAFFOLD's participation |S|/N).
        state = alg.init(rng_or_variables, sample_x, num_clients)
        self.server, self.round = state.server, int(state.round)
        self.init_row = jax.tree.map(lambda a: a[0], state.clients)
        self.templates = jax.eval_shape(
            lambda s, c: alg.client_final(alg.client_init(s, c)), self.server, self.init_row
        )
        self._folds: dict[int, Any] = {}

    def fold(self, messages: Any, metrics: Any, weights_C: np.ndarray) -> np.ndarray:
        """Fold a cohort's stacked replies into the server state; returns who was quarantined."""
        index, alg = stage_at(self.alg, self.round)
        if index not in self._folds:

            def fold(server, messages, metrics, w):
                return aggregate_round(alg, server, (), (messages, (), metrics), w)[::2]

            self._folds[index] = jax.jit(fold)
        w = jnp.asarray(weights_C, jnp.int32)
        self.server, bad = self._folds[index](self.server, messages, metrics, w)
        self.round += 1
        return np.asarray(bad)

    def content(self, key: jax.Array, first_contact: bool) -> RecordDict:
        """A train message's content for this round."""
        round_rec = ArrayRecord(
            array_dict={
                "round": Array(np.asarray(self.round, np.int64)),
                "key": Array(np.asarray(jax.random.key_data(key))),
            }
        )
        content = RecordDict({"server": to_record(self.server), "round": round_rec})
        if first_contact:
            content["init"] = to_record(self.init_row)
        return content

    def replies(self, replies: list[Message]) -> tuple[Any, Any, np.ndarray, list[int]]:
        """Stacked (messages, metrics), weights and client ids of replies, in client-id order."""
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"a client failed: {reply.error.reason}")
        meta = [reply.content["meta"] for reply in replies]
        order = sorted(range(len(replies)), key=lambda i: int(meta[i]["client-id"]))
        msg_t, _, metrics_t = self.templates
        msgs = [from_record(replies[i].content["message"], msg_t, "client message") for i in order]
        mets = [from_record(replies[i].content["metrics"], metrics_t, "metrics") for i in order]
        weights = np.asarray([int(meta[i]["num-examples"]) for i in order], np.int32)
        ids = [int(meta[i]["client-id"]) for i in order]
        return stack_trees(msgs), stack_trees(mets), weights, ids


def cohort_size(num_nodes: int, fraction_train: float, min_train_nodes: int) -> int:
    """How many of ``num_nodes`` connected nodes train: ``fraction_train`` of them, at least
    ``min_train_nodes`` (Flower's FedAvg rule)."""
    if not 0.0 < fraction_train <= 1.0:
        raise ValueError(f"fraction_train must lie in (0, 1], got {fraction_train}.")
    return max(int(num_nodes * fraction_train), min_train_nodes)


def run_server(
    grid: Grid,
    runner: ServerRunner,
    *,
    num_rounds: int,
    seed: int = 0,
    fraction_train: float = 1.0,
    min_train_nodes: int = 2,
    timeout: float | None = None,
    on_round: OnRound | None = None,
) -> Any:
    """Run ``num_rounds`` rounds over ``grid``; returns the final server state."""
    met: set[int] = set()
    for _ in range(num_rounds):
        connected = max(len(list(grid.get_node_ids())), min_train_nodes)
        size = cohort_size(connected, fraction_train, min_train_nodes)
        nodes, _ = sample_nodes(grid, min_train_nodes, size)
        key = round_key(seed, runner.round)
        messages = [
            Message(
                runner.content(key, node not in met),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in sorted(nodes)
        ]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        if len(replies) != len(messages):
            raise RuntimeError(
                f"{len(messages) - len(replies)} of {len(messages)} clients "
                "did not reply within the timeout."
            )
        met |= set(nodes)
        msgs, mets, weights, ids = runner.replies(replies)
        bad = runner.fold(msgs, mets, weights)
        if on_round is not None:
            on_round(
                runner.round,
                runner.server,
                {"client_id": np.asarray(ids), "loss": np.asarray(mets.loss), "quarantined": bad},
            )
    return runner.server


def server_app(
    alg: Algorithm,
    sample_x: Any,
    *,
    num_clients: int,
    num_rounds: int,
    rng_or_variables: Any = None,
    seed: int = 0,
    fraction_train: float = 1.0,
    min_train_nodes: int = 2,
    on_round: OnRound | None = None,
    on_done: Callable[[Any, Context], None] | None = None,
) -> ServerApp:
    """A Flower ``ServerApp`` running ``alg`` for ``num_rounds`` rounds over ``num_clients``
    clients (the population ``init`` sees); the model starts from ``rng_or_variables``
    (default ``jax.random.key(seed)``); ``on_done(server, context)`` gets the final state."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        start = jax.random.key(seed) if rng_or_variables is None else rng_or_variables
        runner = ServerRunner(alg, start, sample_x, num_clients)
        server = run_server(
            grid,
            runner,
            num_rounds=num_rounds,
            seed=seed,
            fraction_train=fraction_train,
            min_train_nodes=min_train_nodes,
            on_round=on_round,
        )
        if on_done is not None:
            on_done(server, context)

    return app
