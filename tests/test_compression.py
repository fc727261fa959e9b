"""Tests for fedjax_bn.compress: stochastic quantization unbiased with exact bytes, top-k with
error feedback sending every update eventually, an STC hand case, local leaves and absent
clients' states untouched, bad input refused, uncompressed bytes equal to a hand count."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    IMAGE_SHAPE,
    CounterModel,
    assert_trees_equal,
    make_clients,
    normal,
    sgd,
    tiny_cnn,
)

import fedjax_bn as fb
from experiments import checks, compression, registry, report, run
from fedjax_bn import compress

SMOKE = str(Path(run.__file__).parent / "configs" / "smoke.py")
SAMPLE_X = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
SIZES = (5, 8, 6)
# tiny_cnn's float leaves by hand: conv 3x3x1x4 + 4, BN scale/bias 4 + 4, BN mean/var 4 + 4,
# dense 64x8 + 8 (8x8 input, one 2x2 pool: 4x4x4 = 64 features), dense 8x3 + 3.
CONV, BN_AFFINE, BN_STATS, DENSE = 36 + 4, 4 + 4, 4 + 4, 64 * 8 + 8 + 8 * 3 + 3


def one_update(seed: int, shapes: dict[str, tuple[int, ...]]) -> dict[str, jax.Array]:
    return {k: jnp.asarray(normal(seed, s, salt=i)) for i, (k, s) in enumerate(shapes.items())}


def round_with(alg: fb.Algorithm, rounds: int = 1, **options: Any) -> tuple[Any, Any]:
    state = alg.init(jax.random.key(0), SAMPLE_X, len(SIZES))
    round_fn = fb.make_round(alg, batch_size=4, **{"executor": "sequential", **options})
    key, result = jax.random.key(1), None
    for _ in range(rounds):
        key, sub = jax.random.split(key)
        state, result = round_fn(state, make_clients(0, SIZES, n_max=8), sub)
    return state, result


# ------------------------------------------------------------------- stochastic quantization


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_stochastic_quantization_is_unbiased(bits: int) -> None:
    """The mean over many keys is the input within 5 standard errors; every value is on the
    grid of ``2**bits`` levels between the input's min and max."""
    v = jnp.asarray(normal(0, (50,)))
    n, levels = 4000, 2**bits - 1
    keys = jax.random.split(jax.random.PRNGKey(3), n)
    out = np.asarray(jax.vmap(lambda k: compress.stochastic_round(k, v, levels))(keys))
    lo, hi = float(v.min()), float(v.max())
    step = (hi - lo) / levels
    se = step / 2 / math.sqrt(n)  # the rounding's std is at most step / 2
    np.testing.assert_array_less(np.abs(out.mean(0) - np.asarray(v)), 5 * se + 1e-6)
    codes = (out - lo) / step
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert len(np.unique(np.round(codes))) <= 2**bits
    assert out.min() >= lo - 1e-6 and out.max() <= hi + 1e-6


def test_quantize_bytes_are_codes_plus_two_scales_per_leaf() -> None:
    shapes = {
        "a": jax.ShapeDtypeStruct((2, 5), jnp.float32),
        "b": jax.ShapeDtypeStruct((3,), jnp.float32),
    }
    # a: 10 values x 4 bits = 5 bytes; b: 3 x 4 = 12 bits -> 2 bytes; 8 bytes of min/max each.
    assert compress.quantize(4).nbytes(shapes) == (5 + 8) + (2 + 8)
    assert compress.quantize(1).nbytes(shapes) == (2 + 8) + (1 + 8)
    assert compress.quantize(16).nbytes(shapes) == (20 + 8) + (6 + 8)


def test_quantize_keys_advance_per_client_and_constant_leaves_pass_exactly() -> None:
    q = compress.quantize(2, seed=5)
    update = {"w": jnp.asarray(normal(1, (20,))), "c": jnp.full((4,), 0.3)}
    k0, k1 = q.init(update, 0), q.init(update, 1)
    assert not np.array_equal(k0, k1)
    (a, nxt), (b, _) = q.apply(update, k0), q.apply(update, k1)
    assert not np.array_equal(a["w"], b["w"]) and not np.array_equal(nxt, k0)
    np.testing.assert_array_equal(a["c"], update["c"])


# ------------------------------------------------------------------- top-k, error feedback, STC


def test_top_k_keeps_the_largest_magnitudes_and_counts_values_and_indices() -> None:
    v = {"w": jnp.asarray([0.5, -2.0, 0.1, 3.0, -0.2, 1.0, 0.0, -4.0, 0.3, 0.05])}
    sent, _ = compress.top_k(0.3).apply(v, ())
    np.testing.assert_array_equal(sent["w"], [0, -2.0, 0, 3.0, 0, 0, 0, -4.0, 0, 0])
    # ceil(0.3 * 10) = 3 entries, each a float32 value and an int32 index.
    assert compress.top_k(0.3).nbytes(v) == 3 * (4 + 4)
    assert compress.top_k(0.01).nbytes(v) == 1 * 8  # at least one entry per leaf


@pytest.mark.parametrize("inner", [compress.top_k(0.1), compress.stc(0.2), compress.quantize(1)])
def test_error_feedback_sends_every_update_eventually(inner: compress.Compressor) -> None:
    """Over several rounds: the sum of what was sent plus the final residual equals the sum of
    the true updates."""
    ef = compress.error_feedback(inner)
    shapes = {"a": (6, 5), "b": (7,)}
    state = ef.init(one_update(0, shapes), 2)
    apply = jax.jit(ef.apply)
    total_sent = total_true = jax.tree.map(jnp.zeros_like, one_update(0, shapes))
    for r in range(6):
        update = one_update(r + 10, shapes)
        sent, state = apply(update, state)
        total_sent = jax.tree.map(jnp.add, total_sent, sent)
        total_true = jax.tree.map(jnp.add, total_true, update)
    got = jax.tree.map(jnp.add, total_sent, state.residual)
    for name in shapes:
        np.testing.assert_allclose(got[name], total_true[name], rtol=1e-5, atol=1e-5)


def test_stc_hand_case() -> None:
    """Top half of [0.5, -2, 0.1, 3] is {3, -2}: their mean magnitude 2.5 with their signs;
    bytes: 2 int32 positions, 2 sign bits in one byte, one float32 magnitude."""
    v = {"w": jnp.asarray([0.5, -2.0, 0.1, 3.0])}
    sent, _ = compress.stc(0.5).apply(v, ())
    np.testing.assert_array_equal(sent["w"], [0.0, -2.5, 0.0, 2.5])
    assert compress.stc(0.5).nbytes(v) == 2 * 4 + 1 + 4


# ------------------------------------------------------------------- inside an algorithm


def test_fedbn_with_compression_never_touches_local_leaves() -> None:
    """Under fedbn the BN layers are local: after a round they are bitwise those of the
    uncompressed run, and no compressor state holds a BN leaf."""
    plain, _ = round_with(fb.fedbn(tiny_cnn(), sgd()))
    comp = compress.error_feedback(compress.top_k(0.1))
    squeezed, _ = round_with(fb.fedbn(tiny_cnn(), sgd(), compress=comp))
    assert_trees_equal(plain.clients.local, squeezed.clients.local)
    residual = squeezed.clients.compress.residual["params"]["ConvBNReLU_0"]
    assert "BatchNorm_0" not in residual and "Conv_0" in residual
    assert "BatchNorm_0" not in squeezed.server.shared["params"]["ConvBNReLU_0"]


def test_a_client_that_sits_out_keeps_its_residual_bitwise() -> None:
    """A client with a step budget of 0 sends nothing: its residual and key are unchanged while
    the others' move; the same in a cohort round for the clients not sampled."""
    comp = compress.error_feedback(compress.quantize(2))
    alg = fb.fedavg(tiny_cnn(), sgd(), compress=comp)
    start = alg.init(jax.random.key(0), SAMPLE_X, len(SIZES)).clients.compress
    state, _ = round_with(alg, rounds=2, budget=(0, 3, 3))
    pairs = zip(jax.tree.leaves(start), jax.tree.leaves(state.clients.compress), strict=True)
    for before, after in pairs:
        np.testing.assert_array_equal(after[0], before[0])
        assert not np.array_equal(after[1], before[1])
    state, result = round_with(alg, rounds=1, cohort_size=1)
    out = [c for c in range(len(SIZES)) if c not in np.asarray(result.clients)]
    pairs = zip(jax.tree.leaves(start), jax.tree.leaves(state.clients.compress), strict=True)
    for before, after in pairs:
        np.testing.assert_array_equal(np.asarray(after)[out], np.asarray(before)[out])


def test_compressor_states_are_the_same_under_every_executor() -> None:
    """Keys live in the client state and advance once per round sent: sequential and vmap
    leave every client the same key."""
    alg = fb.fedavg(CounterModel(), sgd(), compress=compress.quantize(4))
    seq, _ = round_with(alg, rounds=2)
    vec, _ = round_with(alg, rounds=2, executor="vmap")
    assert_trees_equal(seq.clients.compress, vec.clients.compress)


def test_scaffold_server_optimizers_and_robust_aggregators_compose() -> None:
    comp = compress.error_feedback(compress.stc(0.1))
    for alg in (
        fb.scaffold(CounterModel(), sgd(), lr=0.1, compress=comp),
        fb.fedadam(CounterModel(), sgd(), policy="fedbn", compress=comp),
        fb.fedavg(CounterModel(), sgd(), compress=comp, aggregator=fb.aggregators.median()),
    ):
        state, _ = round_with(alg)
        assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.server))
        assert state.clients.compress.residual["params"]


# ------------------------------------------------------------------- bytes


def test_uncompressed_bytes_equal_the_hand_count() -> None:
    """FedAvg sends and receives every float of tiny_cnn (float32); FedBN neither the BN affine
    nor the statistics; a round multiplies by the clients that trained and that took part."""
    fedavg = fb.fedavg(tiny_cnn(), sgd())
    state = fedavg.init(jax.random.key(0), SAMPLE_X, 3)
    every = 4 * (CONV + BN_AFFINE + BN_STATS + DENSE)
    assert compress.client_bytes(fedavg, state) == (every, every)
    fedbn = fb.fedbn(tiny_cnn(), sgd())
    shared = 4 * (CONV + DENSE)
    assert compress.client_bytes(fedbn, fedbn.init(jax.random.key(0), SAMPLE_X, 3)) == (
        shared,
        shared,
    )
    assert compress.round_bytes(compress.WireBytes(10, 7), 2, 3) == (20, 21)


def test_compressed_bytes_count_only_the_shared_float_leaves_as_compressed() -> None:
    """fedavg + q4: the parameters as 4-bit codes plus two scales per leaf, the BN statistics
    (float32) and the int32 counter as they are."""
    alg = fb.fedavg(CounterModel(), sgd(), compress=compress.quantize(4))
    state = alg.init(jax.random.key(0), SAMPLE_X, 3)
    params = {"Dense_0": (64 * 4, 4), "bn": (4, 4), "Dense_1": (4 * 3, 3)}
    codes = sum(math.ceil(n * 4 / 8) + 8 for pair in params.values() for n in pair)
    stats = 4 * (4 + 4) + 4  # mean, var, num_batches_tracked
    assert compress.client_bytes(alg, state).uplink == codes + stats


@pytest.mark.parametrize("bits", [0, 17, 2.5, True])
def test_bad_bits_are_refused(bits: Any) -> None:
    with pytest.raises(ValueError, match="bits must be an int in 1..16"):
        compress.quantize(bits)


@pytest.mark.parametrize("k", [0, -0.1, 1.5])
def test_bad_k_is_refused(k: float) -> None:
    with pytest.raises(ValueError, match=r"k \(the fraction of entries kept\) must be in \(0, 1\]"):
        compress.top_k(k)
    with pytest.raises(ValueError, match="must be in"):
        compress.stc(k)


def test_a_compressor_that_is_not_one_and_dp_are_refused() -> None:
    with pytest.raises(ValueError, match="Compressor"):
        fb.fedavg(tiny_cnn(), sgd(), compress="q4")
    with pytest.raises(ValueError, match="do not compose"):
        fb.fedavg(
            tiny_cnn(),
            sgd(),
            compress=compress.quantize(4),
            dp=fb.privacy.gaussian(noise_multiplier=1.0, clip_norm=1.0),
        )


# ------------------------------------------------------------------- the runner


def test_runner_specs_name_compressors_and_bad_ones_are_config_errors(tmp_path: Path) -> None:
    assert compression.build("") is None
    assert compression.build("ef_top0.01").name == "ef_top0.01"
    assert compression.build("q4").name == "q4" and compression.build("stc0.1").name == "stc0.1"
    for bad in ("q0", "q2.5", "top1.5", "zip9"):
        with pytest.raises(ValueError):
            compression.build(bad)
    argv = ["run", f"--config={SMOKE}", f"--config.out_dir={tmp_path}", "--config.rounds=1"]
    with pytest.raises(registry.ConfigError, match="fedavg\\+q17: bits must be"):
        checks.validate(run.parse_config([*argv, "--config.algorithms=fedavg+q17"]))


def test_history_rows_hold_the_round_bytes(tmp_path: Path) -> None:
    """Uncompressed: every client that trained sends the model it received; q8 sends about a
    quarter of it; the run's summary holds the sums."""
    out = tmp_path / "out"
    argv = [
        "run",
        f"--config={SMOKE}",
        f"--config.out_dir={out}",
        "--config.settings=digits_label_skew",
        "--config.algorithms=fedavg,fedavg+q8",
        "--config.rounds=2",
        "--config.tensorboard=False",
        "--config.compilation_cache=",
    ]
    assert run.main(argv) == 0
    plain = report.read_history(report.history_path(out, "digits_label_skew", "fedavg", 0))
    q8 = report.read_history(report.history_path(out, "digits_label_skew", "fedavg+q8", 0))
    for r in plain:
        assert r["uplink_bytes"] == r["downlink_bytes"] > 0
        assert r["uplink_bytes"] % len(r["cohort"]) == 0
    for a, b in zip(plain, q8, strict=True):
        assert b["downlink_bytes"] == a["downlink_bytes"]
        assert a["uplink_bytes"] / 4.5 < b["uplink_bytes"] < a["uplink_bytes"] / 3.5
    summary = json.loads((out / "summary.json").read_text())
    runs = {r["algorithm"]: r for r in summary["runs"]}
    assert runs["fedavg"]["uplink_bytes"] == sum(r["uplink_bytes"] for r in plain)


def test_round_results_carry_each_slots_bytes() -> None:
    """A client with budget 0 sends nothing but receives the model; a cohort round counts its
    sampled clients only."""
    alg = fb.fedavg(CounterModel(), sgd(), compress=compress.quantize(4))
    state, result = round_with(alg, budget=(0, 3, 3))
    per = compress.client_bytes(alg, state)
    np.testing.assert_array_equal(result.uplink_bytes, [0, per.uplink, per.uplink])
    np.testing.assert_array_equal(result.downlink_bytes, [per.downlink] * 3)
    _, cohort = round_with(alg, cohort_size=2)
    real = np.asarray(cohort.clients) < len(SIZES)
    assert int(np.sum(cohort.downlink_bytes)) == per.downlink * int(real.sum()) == 2 * per.downlink
    assert int(np.sum(cohort.uplink_bytes)) == per.uplink * int(np.sum(cohort.num_seen > 0))
