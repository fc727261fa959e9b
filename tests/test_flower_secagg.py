"""SecAgg+ (``fedjax_bn.flower.secagg``) through Flower's simulation engine: for an algorithm
whose server needs only the clients' weighted mean, the securely aggregated server state
equals the plain path's within SecAgg+'s quantization error, and no reply that reaches the
server holds a client's arrays."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

pytest.importorskip("flwr")

from conftest import CounterModel, make_clients, tiny_cnn  # noqa: E402
from flower_harness import ThreadBackend, without_ray  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

import fedjax_bn as fb  # noqa: E402
from fedjax_bn.flower import client_app, server_app  # noqa: E402
from fedjax_bn.flower.records import leaf_paths  # noqa: E402
from fedjax_bn.flower.secagg import MeanFold, secagg_client_app, secagg_server_app  # noqa: E402
from fedjax_bn.flower.server import ServerRunner  # noqa: E402

SIZES = (7, 5, 9)
ROUNDS = 2
CLIP, QUANT, MAX_WEIGHT = 8.0, 1 << 22, 16.0
# Each client's arrays are quantized to steps of 2 * CLIP / QUANT (3.8e-6) and its weight to
# round(n / MAX_WEIGHT * QUANT); after a second round of training on the slightly different
# model the difference stays well inside this.
ATOL = 1e-4


class Recording(ThreadBackend):
    """ThreadBackend that keeps every reply the server receives."""

    replies: list = []

    def process_message(self, message, context):
        reply, context = super().process_message(message, context)
        Recording.replies.append(reply)
        return reply, context


def run(sapp, capp, monkeypatch) -> None:
    without_ray(monkeypatch)
    module = __import__("sys").modules["flwr.server.superlink.fleet.vce.backend.raybackend"]
    monkeypatch.setattr(module, "RayBackend", Recording)
    run_simulation(sapp, capp, num_supernodes=len(SIZES), backend_name="thread")


def test_secagg_mean_equals_the_plain_fold_within_quantization_and_hides_updates(
    monkeypatch,
) -> None:
    alg = fb.fedbn(tiny_cnn(), optax.sgd(0.1), bn_stats="mean")
    train = make_clients(2, SIZES)
    data = [train.client(c) for c in range(len(SIZES))]

    def load(ctx):
        return data[int(ctx.node_config["partition-id"])]

    out: dict = {}
    common = {"num_clients": 3, "num_rounds": ROUNDS, "min_train_nodes": 3}
    plain = server_app(alg, train.x[0, :1], **common, on_done=lambda s, _: out.update(plain=s))
    run(plain, client_app(alg, load, batch_size=4), monkeypatch)
    Recording.replies.clear()
    secure = secagg_server_app(
        alg,
        train.x[0, :1],
        **common,
        clipping_range=CLIP,
        quantization_range=QUANT,
        max_weight=MAX_WEIGHT,
        on_done=lambda s, _: out.update(secure=s),
    )
    run(secure, secagg_client_app(alg, load, batch_size=4), monkeypatch)

    want, got = dict(leaf_paths(out["plain"])), dict(leaf_paths(out["secure"]))
    assert want.keys() == got.keys() and want
    for path, value in want.items():
        assert np.asarray(got[path]).dtype == np.asarray(value).dtype, path
        np.testing.assert_allclose(got[path], value, rtol=0, atol=ATOL, err_msg=path)
    # ... and it did go through SecAgg+'s quantization (not the plain fold by another road)
    assert any(not np.array_equal(got[p], want[p]) for p in want)
    # 4 SecAgg+ stages a round per client (setup, keys, masked vectors, unmask) and one size
    # query each: none carries an array in the clear (the masked vector travels as bytes).
    assert len(Recording.replies) == len(SIZES) * (1 + 4 * ROUNDS)
    for reply in Recording.replies:
        assert not reply.has_error(), reply.error
        assert all(len(rec) == 0 for rec in reply.content.array_records.values())


def test_secagg_refuses_a_message_with_integer_leaves() -> None:
    alg = fb.fedavg(CounterModel(), optax.sgd(0.1), bn_stats="mean")
    runner = ServerRunner(alg, jax.random.key(0), make_clients(0, (2,)).x[0, :1], 2)
    with pytest.raises(ValueError, match="float leaves only"):
        MeanFold(runner, 0, 2)
