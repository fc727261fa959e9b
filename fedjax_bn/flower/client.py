"""The client side on Flower: one client's round with the library's own local loop, its
persistent state in ``Context.state``.

A train message carries the server state (``"server"``), the round and its PRNG key
(``"round"``), and, the first time the server meets a node, the algorithm's starting client
row (``"init"``). The client runs ``client_init``, the steps of its own batch layout
(``execution.batches``: full batches unmasked, the last partial batch masked, one jitted
call per step as the sequential executor runs them, step keys from ``execution.loop``) and
``client_final``; it keeps its new row (local BN leaves, optimizer state, control variate,
...) in ``Context.state`` and replies with the algorithm's message, its metrics and its
number of examples. A client whose update or loss is not finite keeps its old row (the
server quarantines its message, as every executor does).

The round record also says where the client sits in the simulation's round (a
:class:`Layout`: its slot, the number of slots, the largest client's size, its step budget),
so that without given batch orders the client draws the executors' own shuffle
(``execution.batches.client_batches``), steps and step keys, and stops at its budget as the
sequential executor does: a deployment equals ``make_round`` on the same data and keys.
A query message (``size_reply``) tells the server the client's id and size once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedjax_bn.algorithms.base import Algorithm, init_compiler_options, stage_at, task_of
from fedjax_bn.execution.batches import batches_from_order, client_batches
from fedjax_bn.execution.loop import client_key, local_steps
from fedjax_bn.execution.plan import schedule
from fedjax_bn.execution.quarantine import finite_clients
from fedjax_bn.flower.records import from_record, to_record

STATE_KEY = "fedjax_bn.client"  # the client's persistent row in Context.state
NO_BUDGET = -1  # a round record's budget entry when the run has no step budget
LoadData = Callable[[Context], tuple[Any, Any]]
BatchOrder = Callable[[Context, int, int], Sequence[np.ndarray]]  # (ctx, round, n) -> orders


class Layout(NamedTuple):
    """Where one client's round sits in the simulated round it reproduces."""

    slot: int  # its row of the simulation's client axis (its client id): shuffle, step keys
    num_slots: int  # clients of the simulated federation (C)
    n_max: int  # the largest client's examples: the padded layout [S, B] and its step indices
    budget: int | None = None  # its most local steps this round (fedjax_bn.budgets)


class ClientRunner:
    """One client's round of ``alg`` (every jitted function built once per stage)."""

    def __init__(self, alg: Algorithm, *, batch_size: int, local_epochs: int = 1) -> None:
        if batch_size < 1 or local_epochs < 1:
            raise ValueError(
                f"batch_size and local_epochs must be >= 1, got {batch_size}, {local_epochs}."
            )
        self.alg, self.batch_size, self.epochs = alg, batch_size, local_epochs
        self._stages: dict[int, tuple[Any, Any, Any]] = {}
        self._shuffle: Any = None

    def _jitted(self, round_: int) -> tuple[Any, Any, Any]:
        index, alg = stage_at(self.alg, round_)
        if index not in self._stages:

            def steps(num, masked, carry, x_N, y_N, idx_SB, mask_SB, key, s):
                idx = jax.lax.dynamic_slice_in_dim(idx_SB, s, num)
                mask = jax.lax.dynamic_slice_in_dim(mask_SB, s, num)
                full = 0 if masked else num
                return local_steps(
                    alg.client_step, carry, x_N, y_N, idx, mask, full=full, key=key, first=s
                )

            self._stages[index] = (
                jax.jit(alg.client_init),
                jax.jit(steps, static_argnums=(0, 1)),
                jax.jit(alg.client_final),
            )
        return self._stages[index]

    def templates(self, x_N: Any) -> tuple[Any, Any]:
        """(server state, one client's row) as shapes, for data shaped like ``x_N``."""
        sample = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1, *a.shape[1:]), a.dtype), x_N)
        task = task_of(self.alg)
        # Shapes only, nothing compiles: init from the model's variable shapes (a variables
        # dict skips init's own jit, whose compiler options a trace may not carry).
        variables = jax.eval_shape(lambda x: task.init(jax.random.key(0), x), sample)
        state = jax.eval_shape(lambda v, x: self.alg.init(v, x, 1), dict(variables), sample)
        row = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), state.clients)
        return state.server, row

    def batches(
        self, key: jax.Array, layout: Layout, n: int, orders: Sequence[np.ndarray] | None
    ) -> tuple[jax.Array, jax.Array]:
        """This client's round layout ``(idx [S, B], mask [S, B])``, ``S`` from ``n_max``: the
        given per-epoch ``orders``, else row ``slot`` of the executors' shuffle by ``key``."""
        if orders is not None:
            idx, mask = batches_from_order([orders], layout.n_max, self.batch_size)
            return idx[0], mask[0]
        if self._shuffle is None:
            # Integer-only, so the executors' lower LLVM level gives the same bits, sooner.
            options = init_compiler_options()
            self._shuffle = jax.jit(
                client_batches, static_argnums=(1, 2, 4, 5, 6), compiler_options=options
            )
        sizes = (layout.slot, layout.num_slots, jnp.int32(n), layout.n_max)
        return self._shuffle(key, *sizes, self.batch_size, self.epochs)

    def run(
        self,
        server: Any,
        row: Any,
        x_N: Any,
        y_N: Any,
        key: jax.Array,
        round_: int,
        layout: Layout,
        orders: Sequence[np.ndarray] | None = None,
    ) -> tuple[Any, Any, Any]:
        """``(message, new row, metrics)`` of one round on this client's ``n`` examples."""
        n = int(jax.tree.leaves(y_N)[0].shape[0])
        if n > layout.n_max:
            raise ValueError(f"this client holds {n} examples, more than n_max={layout.n_max}.")
        open_, steps, close = self._jitted(round_)
        idx, mask = self.batches(key, layout, n, orders)
        ckey = client_key(key, jnp.int32(layout.slot))
        carry = open_(server, row)
        calls = schedule(n, layout.n_max, self.batch_size, self.epochs, 1, layout.budget)
        for s, num, masked in calls:
            carry = steps(num, masked, carry, x_N, y_N, idx, mask, ckey, jnp.int32(s))
        message, new_row, metrics = close(carry)
        one = jax.tree.map(lambda a: a[None], (message, new_row))
        ok = bool(finite_clients(one, 1)[0]) and bool(jnp.isfinite(metrics.loss))
        return message, new_row if ok else row, metrics


def client_id_of(context: Context) -> int:
    """The client's id (its step keys and shuffle): ``partition-id`` of its node config,
    else its node id."""
    return int(context.node_config.get("partition-id", context.node_id))


def layout_of(record: Any) -> Layout:
    """The :class:`Layout` a round record carries (written by ``ServerRunner.content``)."""
    value = {k: int(record[k].numpy()) for k in ("slot", "num-slots", "n-max", "budget")}
    budget = None if value["budget"] == NO_BUDGET else value["budget"]
    return Layout(value["slot"], value["num-slots"], value["n-max"], budget)


def size_reply(msg: Message, context: Context, load_data: LoadData) -> Message:
    """Answer the server's query for this client's id and number of examples (what every
    train reply tells it anyway), from which it lays out the rounds."""
    _, y_N = load_data(context)
    n = int(jax.tree.leaves(y_N)[0].shape[0])
    meta = MetricRecord({"num-examples": n, "client-id": client_id_of(context)})
    return Message(content=RecordDict({"meta": meta}), reply_to=msg)


def train_reply(
    runner: ClientRunner,
    msg: Message,
    context: Context,
    load_data: LoadData,
    batch_order: BatchOrder | None = None,
) -> Message:
    """Handle one train message: run the round, keep the row in ``context.state``, reply."""
    x_N, y_N = load_data(context)
    x_N, y_N = jax.tree.map(jnp.asarray, (x_N, y_N))
    n = int(jax.tree.leaves(y_N)[0].shape[0])
    shape = jax.tree.map(lambda a: tuple(a.shape[1:]), x_N)
    server_t, row_t = runner.templates(x_N)
    server = from_record(msg.content["server"], server_t, f"server state (client data {shape})")
    round_rec = msg.content["round"]
    round_, layout = int(round_rec["round"].numpy()), layout_of(round_rec)
    key = jax.random.wrap_key_data(jnp.asarray(round_rec["key"].numpy()))
    if STATE_KEY in context.state:
        row = from_record(context.state[STATE_KEY], row_t, "this client's kept state")
    elif "init" in msg.content:
        row = from_record(msg.content["init"], row_t, "starting client state")
    else:
        raise RuntimeError(
            "this client holds no state and the server sent none: the node lost its "
            "Context.state (restarted); restart the run."
        )
    orders = None if batch_order is None else batch_order(context, round_, n)
    message, row, metrics = runner.run(server, row, x_N, y_N, key, round_, layout, orders)
    context.state[STATE_KEY] = to_record(row)
    meta = MetricRecord({"num-examples": n, "client-id": layout.slot})
    content = RecordDict(
        {"message": to_record(message), "metrics": to_record(metrics), "meta": meta}
    )
    return Message(content=content, reply_to=msg)


def client_app(
    alg: Algorithm,
    load_data: LoadData,
    *,
    batch_size: int,
    local_epochs: int = 1,
    batch_order: BatchOrder | None = None,
) -> ClientApp:
    """A Flower ``ClientApp`` training ``alg`` on ``load_data(context) -> (x_N, y_N)`` (the
    node's own examples, e.g. chosen by ``context.node_config``). ``batch_order(context,
    round, n)``: given per-epoch example orders (default: the executors' shuffle by the round
    key). Step budgets come from the server (``server_app(..., budget=)``)."""
    runner = ClientRunner(alg, batch_size=batch_size, local_epochs=local_epochs)
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return train_reply(runner, msg, context, load_data, batch_order)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return size_reply(msg, context, load_data)

    return app
