"""Tests for fedjax_bn.data: partitions, domains, digits loading, federated batching."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_bn.data import (
    DOMAINS,
    FederatedData,
    apply_domain,
    digits_feature_shift,
    digits_iid,
    digits_label_skew,
    dirichlet_partition,
    dirichlet_partition_with_proportions,
    dirichlet_proportions,
    domain_for_client,
    federate,
    iid_partition,
    load_digits,
    partition_by_proportions,
    pooled_test,
    stack_clients,
)
from fedjax_bn.execution import gather_batch, round_batches, steps_per_epoch, valid_steps

FAST = settings(max_examples=20, deadline=None, derandomize=True)


def _assert_covers(parts: list[np.ndarray], n: int) -> None:
    """Every index in range(n) appears in exactly one part."""
    allidx = np.concatenate(parts) if parts else np.array([], dtype=np.int64)
    np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64


# ---------------------------------------------------------------- partitions


@FAST
@given(n=st.integers(1, 300), c=st.integers(1, 30), seed=st.integers(0, 2**31))
def test_iid_partition_covers_once(n, c, seed):
    c = min(c, n)
    parts = iid_partition(n, c, seed=seed)
    assert len(parts) == c
    _assert_covers(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for a, b in zip(parts, iid_partition(n, c, seed=seed), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("c", [0, -1, 11])
def test_iid_partition_rejects_bad_client_counts(c):
    with pytest.raises(ValueError, match="clients"):
        iid_partition(10, c, seed=0)


@FAST
@given(
    k=st.integers(1, 6),
    c=st.integers(1, 8),
    alpha=st.floats(0.05, 10.0),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_proportions_rows_sum_to_one(k, c, alpha, seed):
    p = dirichlet_proportions(k, c, alpha, rng=np.random.default_rng(seed))
    assert p.shape == (k, c)
    assert np.all(p >= 0)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-9)


@FAST
@given(
    n=st.integers(1, 200),
    k=st.integers(1, 5),
    c=st.integers(1, 8),
    alpha=st.floats(0.05, 5.0),
    seed=st.integers(0, 2**31),
)
def test_partition_by_proportions_covers_once(n, k, c, alpha, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, size=n)
    p = dirichlet_proportions(k, c, alpha, rng=rng)
    parts = partition_by_proportions(labels, p, seed=seed)
    assert len(parts) == c
    _assert_covers(parts, n)


def test_partition_by_proportions_follows_proportions():
    labels = np.repeat([0, 1], 100)
    p = np.array([[1.0, 0.0], [0.25, 0.75]])
    a, b = partition_by_proportions(labels, p, seed=0)
    assert np.all(labels[a][:100] == 0) and np.sum(labels[a] == 1) == 25
    assert np.all(labels[b] == 1) and b.size == 75


@FAST
@given(
    n=st.integers(60, 400),
    k=st.integers(2, 6),
    c=st.integers(1, 6),
    alpha=st.floats(0.3, 10.0),
    min_size=st.integers(0, 10),
    seed=st.integers(0, 2**31),
)
def test_dirichlet_partition_covers_once_and_honours_min_size(n, k, c, alpha, min_size, seed):
    labels = np.random.default_rng(seed).integers(0, k, size=n)
    parts, p = dirichlet_partition_with_proportions(
        labels, c, alpha, min_size=min_size, seed=seed, num_classes=k
    )
    assert p.shape == (k, c)
    _assert_covers(parts, n)
    assert min(x.size for x in parts) >= min_size
    again = dirichlet_partition(labels, c, alpha, min_size=min_size, seed=seed, num_classes=k)
    for a, b in zip(parts, again, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("n,c,min_size", [(100, 10, 11), (100, 20, 6), (1000, 50, 19)])
def test_dirichlet_partition_impossible_min_size_explains(n, c, min_size):
    labels = np.arange(n) % 10
    with pytest.raises(ValueError, match="min_size") as err:
        dirichlet_partition(labels, c, 0.01, min_size=min_size, seed=0, max_attempts=5)
    msg = str(err.value)
    assert "alpha" in msg and "fewer clients" in msg and "achieved" in msg


@pytest.mark.parametrize("alpha", [0.0, -1.0])
def test_dirichlet_partition_rejects_nonpositive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(np.arange(50) % 5, 2, alpha, seed=0)


def test_dirichlet_partition_rejects_bad_labels():
    with pytest.raises(ValueError, match=r"\[5, 7\]"):
        dirichlet_partition(np.array([0, 1, 5, 7, 2]), 2, 1.0, min_size=0, seed=0, num_classes=3)
    with pytest.raises(ValueError, match=r"\[-2, -1\]"):
        dirichlet_partition(np.array([0, -1, -2, 2]), 2, 1.0, min_size=0, seed=0)
    with pytest.raises(ValueError, match="1-D integer"):
        dirichlet_partition(np.array([0.0, 1.0]), 2, 1.0, min_size=0, seed=0)
    with pytest.raises(ValueError, match="1-D integer"):
        dirichlet_partition(np.zeros((3, 2), dtype=int), 2, 1.0, min_size=0, seed=0)


def test_dirichlet_partition_rejects_too_many_clients():
    with pytest.raises(ValueError, match="more clients than examples"):
        dirichlet_partition(np.arange(5) % 2, 6, 1.0, min_size=0, seed=0)


# ---------------------------------------------------------------- domains

_images = st.tuples(st.integers(0, 4), st.integers(1, 6), st.integers(1, 3), st.integers(0, 99))


@FAST
@given(spec=_images, name=st.sampled_from(list(DOMAINS)))
def test_domains_keep_shape_range_dtype_and_are_deterministic(spec, name):
    n, hw, ch, seed = spec
    x = np.random.default_rng(seed).random((n, hw, hw, ch), dtype=np.float32)
    out = apply_domain(x, name, seed=seed)
    assert out.shape == x.shape and out.dtype == np.float32
    assert np.all((out >= 0) & (out <= 1))
    np.testing.assert_array_equal(out, apply_domain(x, name, seed=seed))


def test_domains_do_what_they_say():
    x = np.random.default_rng(0).random((2, 4, 4, 1), dtype=np.float32)
    np.testing.assert_allclose(apply_domain(x, "invert", seed=0), 1 - x)
    np.testing.assert_allclose(apply_domain(x, "low_contrast", seed=0), 0.3 + 0.4 * x, rtol=1e-6)
    np.testing.assert_allclose(apply_domain(x, "flip", seed=0), x[:, :, ::-1])
    np.testing.assert_allclose(apply_domain(x, "gamma", seed=0), x**0.4, rtol=1e-6)
    rot = apply_domain(x, "rotate90", seed=0)
    np.testing.assert_allclose(np.rot90(rot, k=3, axes=(1, 2)), x)
    const = np.full((1, 3, 3, 1), 0.5, np.float32)
    np.testing.assert_allclose(apply_domain(const, "blur", seed=0), const, rtol=1e-6)
    assert not np.allclose(apply_domain(x, "noise", seed=0), apply_domain(x, "noise", seed=1))


def test_domain_for_client_cycles_and_unknown_name_lists_valid():
    names = list(DOMAINS)
    assert [domain_for_client(c) for c in range(2 * len(names))] == names * 2
    with pytest.raises(ValueError, match="identity"):
        apply_domain(np.zeros((1, 2, 2, 1)), "sepia", seed=0)


# ---------------------------------------------------------------- digits


def test_load_digits_shapes_dtypes_range_and_stratification():
    x_tr, y_tr, x_te, y_te = load_digits(test_fraction=0.2, seed=0)
    assert x_tr.shape[1:] == (8, 8, 1) and x_te.shape[1:] == (8, 8, 1)
    assert len(x_tr) + len(x_te) == 1797 and len(x_tr) == len(y_tr) and len(x_te) == len(y_te)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int32
    assert x_tr.min() >= 0 and x_tr.max() <= 1 and x_tr.max() == 1
    frac_tr = np.bincount(y_tr, minlength=10) / len(y_tr)
    frac_te = np.bincount(y_te, minlength=10) / len(y_te)
    np.testing.assert_allclose(frac_tr, frac_te, atol=0.01)
    np.testing.assert_array_equal(y_te, load_digits(test_fraction=0.2, seed=0)[3])
    assert not np.array_equal(y_te, load_digits(test_fraction=0.2, seed=1)[3])


# ---------------------------------------------------------------- federated data


def _toy(n=12, k=3):
    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)
    return x, (np.arange(n) % k).astype(np.int32)


def test_stack_clients_pads_and_keeps_dtype():
    xs = [np.ones((3, 2, 2, 1), np.uint8), np.zeros((0, 2, 2, 1), np.uint8)]
    ca = stack_clients(xs, [np.array([1, 2, 0]), np.array([], np.int32)])
    assert ca.x.shape == (2, 3, 2, 2, 1) and ca.x.dtype == jnp.uint8
    assert ca.y.dtype == jnp.int32 and ca.n.tolist() == [3, 0]
    empty = stack_clients([np.zeros((0, 1, 1, 1))], [np.zeros((0,), int)])
    assert empty.x.shape[1] == 1


def test_federate_rejects_empty_clients_bad_labels_and_bad_parts():
    x, y = _toy()
    parts = [np.arange(6), np.arange(6, 12)]
    with pytest.raises(ValueError, match=r"clients \[1\]"):
        federate(x, y, [np.arange(12), np.array([], int)], x, y, parts, num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        federate(x, y, parts, x, y, parts, num_classes=2)
    with pytest.raises(ValueError, match="outside"):
        federate(x, y, [np.arange(6), np.array([6, 12])], x, y, parts, num_classes=3)


def test_federate_applies_transforms_per_client():
    x, y = _toy()
    parts = [np.arange(6), np.arange(6, 12)]
    tf = [lambda a: a, lambda a: a + 100]
    data = federate(x, y, parts, x, y, parts, num_classes=3, transforms=tf)
    assert float(data.train.x[0].max()) == 5 and float(data.train.x[1].min()) == 106
    assert float(data.test.x[1].min()) == 106


@FAST
@given(seed=st.integers(0, 2**31), c=st.integers(1, 6))
def test_pooled_test_sizes_add_up(seed, c):
    x, y = _toy(n=30)
    tr = iid_partition(30, c, seed=seed)
    te = [p[p % 2 == 0] for p in iid_partition(30, c, seed=seed + 1)]  # some may be empty
    data = federate(x, y, tr, x, y, te, num_classes=3)
    assert isinstance(data, FederatedData) and data.num_clients == c
    px, py = pooled_test(data)
    assert len(px) == len(py) == sum(p.size for p in te)
    np.testing.assert_array_equal(np.sort(px.ravel()), np.sort(np.concatenate(te)))
    np.testing.assert_array_equal(data.train_sizes(), [p.size for p in tr])


def test_builders():
    skew = digits_label_skew(8, 0.3, seed=0, min_size=10)
    assert skew.num_clients == 8 and skew.train_sizes().min() >= 10
    assert skew.train_sizes().sum() + len(pooled_test(skew)[1]) == 1797
    shift = digits_feature_shift(5, seed=0)
    assert shift.domains == tuple(domain_for_client(c) for c in range(5))
    assert float(shift.train.x[1].mean()) > float(shift.train.x[0].mean())  # inverted is bright
    iid = digits_iid(4, seed=0)
    assert iid.domains == () and iid.train_sizes().sum() + int(iid.test.n.sum()) == 1797


# ---------------------------------------------------------------- batching

_round = jax.jit(round_batches, static_argnums=(2, 3, 4))
# Few static (n_max, batch, epochs) combos: each one compiles once (~1 s on CPU).
N_MAX, CONFIGS = 13, [(1, 1), (4, 2), (16, 1)]


@FAST
@given(
    sizes=st.lists(st.integers(0, N_MAX), min_size=4, max_size=4),
    config=st.sampled_from(CONFIGS),
    seed=st.integers(0, 2**31),
)
def test_round_batches_is_a_per_epoch_permutation(sizes, config, seed):
    batch, epochs = config
    idx, mask = _round(jax.random.key(seed), jnp.array(sizes, jnp.int32), N_MAX, batch, epochs)
    spe = steps_per_epoch(N_MAX, batch)
    assert idx.shape == mask.shape == (len(sizes), epochs * spe, batch)
    assert idx.dtype == jnp.int32 and mask.dtype == jnp.bool_
    idx, mask = np.asarray(idx), np.asarray(mask)
    assert np.all((idx >= 0) & (idx < N_MAX)) and np.all(idx[~mask] == 0)
    for c, n_c in enumerate(sizes):
        for e in range(epochs):
            i = idx[c, e * spe : (e + 1) * spe].ravel()
            m = mask[c, e * spe : (e + 1) * spe].ravel()
            assert m[:n_c].all() and not m[n_c:].any()
            np.testing.assert_array_equal(np.sort(i[m]), np.arange(n_c))
        live = np.flatnonzero(mask[c].any(axis=1))
        np.testing.assert_array_equal(live, valid_steps(n_c, N_MAX, batch, epochs))


def test_round_batches_deterministic_per_key():
    n = jnp.array([13, 9, 1, 0], jnp.int32)
    a = _round(jax.random.key(1), n, N_MAX, 4, 2)
    b = _round(jax.random.key(1), n, N_MAX, 4, 2)
    c = _round(jax.random.key(2), n, N_MAX, 4, 2)
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])
    spe = steps_per_epoch(N_MAX, 4)
    assert not np.array_equal(a[0][0, :spe], a[0][0, spe:])  # epochs reshuffle


def test_valid_steps_example():
    # n_max=10, batch 4 -> 3 steps per epoch; a client of 5 fills 2 of them.
    np.testing.assert_array_equal(valid_steps(5, 10, 4, 2), [0, 1, 3, 4])
    assert valid_steps(0, 10, 4, 2).size == 0


def test_gather_batch_takes_rows():
    x = jnp.arange(10.0).reshape(5, 2)
    y = jnp.arange(5)
    xb, yb = gather_batch(x, y, jnp.array([4, 0, 0]))
    np.testing.assert_array_equal(yb, [4, 0, 0])
    np.testing.assert_array_equal(xb, x[jnp.array([4, 0, 0])])


@pytest.mark.parametrize("n_max,batch", [(0, 2), (3, 0)])
def test_steps_per_epoch_rejects_nonpositive(n_max, batch):
    with pytest.raises(ValueError, match=">= 1"):
        steps_per_epoch(n_max, batch)


def test_client_rows_are_the_real_examples_and_compile_per_shape_not_per_size():
    """``ClientArrays.client(c)`` is client c's unpadded (x, y), and reading clients of many
    distinct sizes compiles a fixed number of programs (device slicing ``x[c, :n]`` compiled
    one per size)."""
    rng = np.random.default_rng(0)
    sizes = [0, 3, 5, 7, 11, 13]
    xs = [rng.normal(size=(n, 2, 2, 1)).astype(np.float32) for n in sizes]
    ys = [rng.integers(0, 4, n).astype(np.int32) for n in sizes]
    arrays = stack_clients(xs, ys)
    compiles = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for c, (x, y) in enumerate(zip(xs, ys, strict=True)):
            got_x, got_y = arrays.client(c)
            np.testing.assert_array_equal(got_x, x)
            np.testing.assert_array_equal(got_y, y)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert len(compiles) <= 4, compiles  # a row read of x and of y, each gather + squeeze
