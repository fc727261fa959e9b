"""The Flower adapter (``fedjax_bn.flower``): records by path, and the same numbers as the
in-process rounds when run through Flower's simulation engine.

Flower's ``run_simulation`` runs ClientApps on a Ray backend, and ``ray`` is not installed
here (nor in the ``test`` extra): the engine's backend is replaced by
``flower_harness.ThreadBackend``, which runs each ClientApp in-process the way Ray's actor does
(``app(message, context)``). Everything else is Flower's own: the LinkState, the in-memory
Grid, the SuperNodes' contexts, the ServerApp thread and the Message/Record serialization.
"""

from __future__ import annotations

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

flwr = pytest.importorskip("flwr")

from conftest import CountedBN, CounterModel, assert_trees_equal, make_clients  # noqa: E402
from flower_harness import ThreadBackend, without_ray  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import fedjax_bn as fb  # noqa: E402
import fedjax_bn.flower  # noqa: E402, F401
from fedjax_bn.execution import batches_from_order  # noqa: E402
from fedjax_bn.execution.batches import client_batches  # noqa: E402
from fedjax_bn.flower import client_app, from_record, server_app, to_record  # noqa: E402
from fedjax_bn.flower.client import STATE_KEY, ClientRunner, Layout, train_reply  # noqa: E402
from fedjax_bn.flower.records import leaf_paths, stack_trees  # noqa: E402
from fedjax_bn.flower.server import ServerRunner, round_key  # noqa: E402

SIZES = (7, 5, 9)  # three clients, none a multiple of the batch: partial, masked batches
BATCH = 4
ROUNDS = 3
SEED = 0


@pytest.fixture
def no_ray(monkeypatch):
    """Flower's simulation engine on ``ThreadBackend``, no telemetry."""
    without_ray(monkeypatch)


def orders(c: int, r: int) -> list[np.ndarray]:
    """Client ``c``'s given example order in round ``r`` (one epoch)."""
    return [np.random.default_rng(100 * r + c).permutation(SIZES[c])]


def algorithms():
    model = CounterModel()
    prox = fb.fedbn_prox(model, optax.sgd(0.1, momentum=0.9), mu=0.1, persist_client_optimizer=True)
    return {"fedbn_prox": prox, "scaffold": fb.scaffold(model, optax.sgd(0.1), lr=0.1)}


def in_process(alg, train, sample_x):
    """The library's own rounds (sequential executor) on the same data, keys and orders."""
    state = alg.init(jax.random.key(SEED), sample_x, len(SIZES))
    step = fb.make_round(alg, executor="sequential", batch_size=BATCH, client_threads=1)
    for r in range(ROUNDS):
        batches = batches_from_order([orders(c, r) for c in range(len(SIZES))], max(SIZES), BATCH)
        state, _ = step(state, train, round_key(SEED, r), batches)
    return state


@pytest.mark.parametrize("name", ["fedbn_prox", "scaffold"])
def test_simulation_matches_in_process_rounds_bitwise(no_ray, name) -> None:
    alg = algorithms()[name]
    train = make_clients(0, SIZES)
    sample_x = train.x[0, :1]
    data = [train.client(c) for c in range(len(SIZES))]
    out = {}
    ThreadBackend.seen.clear()

    def load(context: Context):
        return data[int(context.node_config["partition-id"])]

    def order(context: Context, round_: int, n: int):
        return orders(int(context.node_config["partition-id"]), round_)

    def done(server, context):
        out["server"] = server

    capp = client_app(alg, load, batch_size=BATCH, batch_order=order)
    sapp = server_app(
        alg,
        sample_x,
        num_clients=len(SIZES),
        num_rounds=ROUNDS,
        seed=SEED,
        min_train_nodes=len(SIZES),
        on_done=done,
    )
    run_simulation(sapp, capp, num_supernodes=len(SIZES), backend_name="thread")

    want = in_process(alg, train, sample_x)
    assert_trees_equal(want.server, out["server"])
    _, row_t = ClientRunner(alg, batch_size=BATCH).templates(data[0][0])
    for c in range(len(SIZES)):  # each client's kept row is the simulation's row c
        context, reply = ThreadBackend.seen[c]
        kept = from_record(context.state[STATE_KEY], row_t)
        assert_trees_equal(jax.tree.map(lambda a, c=c: a[c], want.clients), kept)
        # what reached the server: the message, metrics and counts, never a local leaf
        assert set(reply.content.keys()) == {"message", "metrics", "meta"}
        sent = " ".join(reply.content["message"].keys())
        local = [p for p, _ in leaf_paths(want.clients.local)]
        assert not any(p in sent for p in local), (local, sent)
        assert local or name == "scaffold"  # fedbn keeps BN leaves local; fedavg has none


class DropoutCounter(nn.Module):
    """CounterModel with dropout: its masks come from the step keys, so a client that drew
    other step keys than the simulation's would train to other numbers."""

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
        x = nn.Dense(4)(x.reshape((x.shape[0], -1)).astype(jnp.float32))
        x = nn.relu(CountedBN()(x, train=train, mask=mask))
        x = nn.Dropout(0.5, deterministic=not train)(x)
        return nn.Dense(10)(x)


@pytest.mark.parametrize(
    "budget", [None, [3, 0, 2], fb.budgets.uniform_steps(0, 5)], ids=["none", "fixed", "uniform"]
)
def test_without_orders_clients_draw_the_executors_shuffle_keys_and_budgets(no_ray, budget) -> None:
    """No batch orders given, 2 local epochs, dropout, clients of unequal sizes: each deployed
    client lays its round out on the largest client's size, shuffles as the executors do,
    draws their step keys and stops at the budget the server drew; the server state and every
    kept row equal ``make_round(..., budget=)`` bitwise."""
    alg = fb.fedbn_prox(
        DropoutCounter(), optax.sgd(0.1, momentum=0.9), mu=0.1, persist_client_optimizer=True
    )
    train = make_clients(1, SIZES)
    data = [train.client(c) for c in range(len(SIZES))]
    out = {}
    ThreadBackend.seen.clear()
    load = lambda ctx: data[int(ctx.node_config["partition-id"])]  # noqa: E731
    capp = client_app(alg, load, batch_size=BATCH, local_epochs=2)
    sapp = server_app(
        alg,
        train.x[0, :1],
        num_clients=len(SIZES),
        num_rounds=ROUNDS,
        budget=budget,
        seed=SEED,
        min_train_nodes=len(SIZES),
        on_done=lambda server, _: out.update(server=server),
    )
    run_simulation(sapp, capp, num_supernodes=len(SIZES), backend_name="thread")

    state = alg.init(jax.random.key(SEED), train.x[0, :1], len(SIZES))
    step = fb.make_round(
        alg, executor="sequential", batch_size=BATCH, local_epochs=2, budget=budget
    )
    for r in range(ROUNDS):
        state, _ = step(state, train, round_key(SEED, r))
    assert_trees_equal(state.server, out["server"])
    _, row_t = ClientRunner(alg, batch_size=BATCH).templates(data[0][0])
    for c in range(len(SIZES)):
        kept = from_record(ThreadBackend.seen[c][0].state[STATE_KEY], row_t)
        assert_trees_equal(jax.tree.map(lambda a, c=c: a[c], state.clients), kept)


def test_client_batches_are_rows_of_the_round_shuffle() -> None:
    key, n = jax.random.key(3), jnp.asarray([7, 5, 9, 1])
    idx, mask = fb.execution.round_batches(key, n, 9, BATCH, 2)
    for c in range(4):
        row = client_batches(key, c, 4, int(n[c]), 9, BATCH, 2)
        np.testing.assert_array_equal(row[0], idx[c])
        np.testing.assert_array_equal(row[1], mask[c])


def test_records_round_trip_keeps_dtypes_and_integer_leaves() -> None:
    tree = {
        "w": np.arange(6, dtype=np.float32).reshape(2, 3),
        "count": np.int32(7),
        "flags": np.array([True, False]),
        "half": jnp.arange(3, dtype=jnp.bfloat16),
        "nested": (np.int64(3), None, {"u": np.uint32(2)}),
    }
    record = to_record(tree)
    assert all("[" in k for k in record)  # keyed by pytree path
    back = from_record(record, tree)
    assert_trees_equal(jax.tree.map(np.asarray, tree), back)
    assert back["count"].dtype == np.int32 and back["flags"].dtype == np.bool_


def test_a_tree_that_does_not_match_is_refused_with_its_path() -> None:
    tree = {"a": np.zeros(3, np.float32), "b": np.zeros((), np.int32)}
    with pytest.raises(ValueError, match=r"missing \[\"\['b'\]\"\]"):
        from_record(to_record({"a": tree["a"]}), tree)
    with pytest.raises(ValueError, match=r"\['a'\] arrived as float32\[4\], expected float32\[3\]"):
        from_record(to_record({**tree, "a": np.zeros(4, np.float32)}), tree)
    with pytest.raises(ValueError, match=r"\['b'\] arrived as float32\[\], expected int32\[\]"):
        from_record(to_record({**tree, "b": np.zeros((), np.float32)}), tree)


def test_a_client_whose_data_has_another_shape_gets_a_clear_error(no_ray) -> None:
    alg = algorithms()["scaffold"]
    train = make_clients(0, SIZES)
    server = fb.flower.ServerRunner(alg, jax.random.key(0), train.x[0, :1], 3)
    server.sizes[1] = (0, SIZES[0])  # node 1 is client 0 (what its size query tells)
    content = server.content(round_key(0, 0), 1, first_contact=True)
    msg = Message(content, dst_node_id=1, message_type="train")
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    x, y = train.client(0)
    runner = ClientRunner(alg, batch_size=BATCH)
    with pytest.raises(ValueError, match=r"client data \(8, 8, 2\).*arrived as float32"):
        train_reply(runner, msg, context, lambda _: (np.concatenate([x, x], -1), y))
    reply = train_reply(runner, msg, context, lambda _: (x, y))  # the right shape trains
    assert STATE_KEY in context.state and int(reply.content["meta"]["num-examples"]) == SIZES[0]


def test_import_fedjax_bn_does_not_import_flower_and_a_missing_flower_says_what_to_install():
    code = (
        "import sys, fedjax_bn; assert 'flwr' not in sys.modules, 'flwr imported'; "
        "sys.modules['flwr'] = None\n"
        "try:\n    import fedjax_bn.flower\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "fedjax_bn[flower]"' in out.stdout


def test_a_sampled_cohort_trains_and_clients_that_sit_out_keep_their_state(
    no_ray, monkeypatch
) -> None:
    alg = algorithms()["fedbn_prox"]
    train = make_clients(0, SIZES)
    data = [train.client(c) for c in range(len(SIZES))]
    picks = iter([0, 1, 0])  # the node trains, sits round 2 out, trains again in round 3

    def sample_nodes(grid, min_available, size):  # Flower's, made deterministic
        nodes = sorted(grid.get_node_ids())
        return [nodes[next(picks)]], nodes

    monkeypatch.setattr(fedjax_bn.flower.server, "sample_nodes", sample_nodes)
    cohorts, out = [], {}
    capp = client_app(alg, lambda ctx: data[int(ctx.node_config["partition-id"])], batch_size=BATCH)
    sapp = server_app(
        alg,
        train.x[0, :1],
        num_clients=3,
        num_rounds=3,
        fraction_train=0.34,
        min_train_nodes=1,
        on_round=lambda r, s, metrics: cohorts.append(metrics["client_id"].tolist()),
        on_done=lambda server, _: out.update(server=server),
    )
    run_simulation(sapp, capp, num_supernodes=len(SIZES), backend_name="thread")
    assert len(cohorts) == 3 and cohorts[0] == cohorts[2] != cohorts[1], cohorts

    # The same rounds replayed without Flower, each client's row held here: equal bitwise
    # only if the node that sat round 2 out started round 3 from the row it kept.
    ref = ServerRunner(alg, jax.random.key(SEED), train.x[0, :1], 3)
    rows, client = dict.fromkeys(range(3), ref.init_row), ClientRunner(alg, batch_size=BATCH)
    for r, cohort in enumerate(cohorts):
        key = round_key(SEED, r)
        layouts = {c: Layout(c, 3, max(SIZES)) for c in cohort}
        outs = [client.run(ref.server, rows[c], *data[c], key, r, layouts[c]) for c in cohort]
        rows.update({c: o[1] for c, o in zip(cohort, outs, strict=True)})
        weights = np.asarray([SIZES[c] for c in cohort])
        ref.fold(stack_trees([o[0] for o in outs]), stack_trees([o[2] for o in outs]), weights)
    assert_trees_equal(ref.server, out["server"])
