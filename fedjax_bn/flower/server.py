"""The server side on Flower: ``init`` and ``server_update`` of any algorithm over a ``Grid``.

Each round samples a cohort of the connected nodes (``fraction_train`` of them, at least
``min_train_nodes``, with Flower's own ``sample_nodes``), sends each the server state and the
round's key (and, to a node it has not met yet, the algorithm's starting client row), and folds
the replies with the executors' own :func:`~fedjax_bn.execution.quarantine.aggregate_round`
(weights: the clients' example counts; a non-finite message is dropped). Clients' rows never
come back: the server holds no ``FedState.clients``. Nodes that sit a round out keep their
state on their side.

Before a node's first round the server asks it (a query message) for its client id and its
number of examples, and then tells every client its :class:`~fedjax_bn.flower.client.Layout`
(slot, number of slots, the largest client's size) and, with a ``budget``, its step budget
drawn as ``make_round`` draws it: so a deployed round is the simulated round.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedjax_bn import budgets
from fedjax_bn.algorithms.base import Algorithm, stage_at
from fedjax_bn.execution.quarantine import aggregate_round
from fedjax_bn.execution.streams import BUDGET_STREAM
from fedjax_bn.flower.client import NO_BUDGET
from fedjax_bn.flower.records import from_record, stack_trees, to_record

OnRound = Callable[[int, Any, dict[str, np.ndarray]], None]  # (round, server, metrics)


def round_key(seed: int, round_: int) -> jax.Array:
    """Round ``round_``'s PRNG key: ``fold_in(key(seed), round_)`` (pass the same to an
    in-process ``make_round`` to reproduce a deployed run)."""
    return jax.random.fold_in(jax.random.key(seed), round_)


class ServerRunner:
    """The server's state and its jitted fold, for ``num_clients`` clients in all; ``budget``:
    each client's most local steps per round, as ``make_round(budget=)`` takes it."""

    def __init__(
        self,
        alg: Algorithm,
        rng_or_variables: Any,
        sample_x: Any,
        num_clients: int,
        budget: budgets.Budget | Sequence[int] | np.ndarray | None = None,
    ):
        self.alg, self.num_clients, self.budget = alg, num_clients, budgets.as_budget(budget)
        self.sizes: dict[int, tuple[int, int]] = {}  # node id -> (client id, examples)
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

    def draw_budget(self, key: jax.Array) -> np.ndarray | None:
        """This round's budgets per client id (None without one), drawn as ``make_round``
        draws them: from the round key's ``BUDGET_STREAM``."""
        stream = None if self.budget is None else jax.random.fold_in(key, BUDGET_STREAM)
        return budgets.draw(self.budget, stream, self.round, self.num_clients)

    def content(
        self, key: jax.Array, node: int, first_contact: bool, budget_C: np.ndarray | None = None
    ) -> RecordDict:
        """A train message's content for ``node`` this round (its sizes already learned)."""
        cid, _ = self.sizes[node]
        layout = {
            "slot": cid,
            "num-slots": self.num_clients,
            "n-max": max(n for _, n in self.sizes.values()),
            "budget": NO_BUDGET if budget_C is None else int(budget_C[cid]),
        }
        arrays = {"round": self.round, **layout}
        round_rec = ArrayRecord(
            array_dict={
                **{k: Array(np.asarray(v, np.int64)) for k, v in arrays.items()},
                "key": Array(np.asarray(jax.random.key_data(key))),
            }
        )
        content = RecordDict({"server": to_record(self.server), "round": round_rec})
        if first_contact:
            content["init"] = to_record(self.init_row)
        return content

    def learn_sizes(self, replies: list[Message]) -> None:
        """Record each queried node's client id and size; refuse ids outside the federation."""
        for reply in replies:
            if reply.has_error():
                raise RuntimeError(f"a client failed to report its size: {reply.error.reason}")
            meta = reply.content["meta"]
            cid, n = int(meta["client-id"]), int(meta["num-examples"])
            taken = {c for node, (c, _) in self.sizes.items() if node != reply.metadata.src_node_id}
            if not 0 <= cid < self.num_clients or cid in taken:
                raise ValueError(
                    f"a node reports client id {cid}: ids must be distinct and in "
                    f"[0, num_clients={self.num_clients})."
                )
            self.sizes[reply.metadata.src_node_id] = (cid, n)

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


def exchange(grid: Grid, messages: list[Message], timeout: float | None) -> list[Message]:
    """``grid.send_and_receive``, refusing a round where a node did not reply."""
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    if len(replies) != len(messages):
        raise RuntimeError(
            f"{len(messages) - len(replies)} of {len(messages)} clients "
            "did not reply within the timeout."
        )
    return replies


def query_sizes(grid: Grid, runner: ServerRunner, nodes: list[int], timeout: float | None):
    """Ask the ``nodes`` whose size the server does not know yet for their id and size."""
    new = sorted(node for node in nodes if node not in runner.sizes)
    if new:
        queries = [
            Message(RecordDict(), dst_node_id=node, message_type=MessageType.QUERY) for node in new
        ]
        runner.learn_sizes(exchange(grid, queries, timeout))


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
        nodes, every = sample_nodes(grid, min_train_nodes, size)
        query_sizes(grid, runner, list(every), timeout)
        key = round_key(seed, runner.round)
        budget_C = runner.draw_budget(key)
        messages = [
            Message(
                runner.content(key, node, node not in met, budget_C),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in sorted(nodes)
        ]
        replies = exchange(grid, messages, timeout)
        met |= set(nodes)
        msgs, mets, weights, ids = runner.replies(replies)
        if budget_C is not None:  # a client with budget 0 trained on nothing: weight 0
            weights = np.asarray(budgets.budget_weights(weights, budget_C[ids]))
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
    budget: budgets.Budget | Sequence[int] | np.ndarray | None = None,
    seed: int = 0,
    fraction_train: float = 1.0,
    min_train_nodes: int = 2,
    on_round: OnRound | None = None,
    on_done: Callable[[Any, Context], None] | None = None,
) -> ServerApp:
    """A Flower ``ServerApp`` running ``alg`` for ``num_rounds`` rounds over ``num_clients``
    clients (the population ``init`` sees); the model starts from ``rng_or_variables``
    (default ``jax.random.key(seed)``); ``budget``: each client's most local steps per round
    (``make_round(budget=)``'s forms); ``on_done(server, context)`` gets the final state."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        start = jax.random.key(seed) if rng_or_variables is None else rng_or_variables
        runner = ServerRunner(alg, start, sample_x, num_clients, budget)
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
