"""Inputs and labels as pytrees: ClientArrays, from_client_arrays, builders and the store's
gather with dict x and float, multi-hot or tuple y; plain arrays build what they built before."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from fedjax_bn.data import (
    ClientArrays,
    check_client_labels,
    dirichlet_partition_with_proportions,
    from_client_arrays,
    iid,
    iid_partition,
    label_skew,
    partition_by_proportions,
    pooled_test,
    stack_clients,
)
from fedjax_bn.execution.store import gather_data, to_host

TRAIN_SIZES, TEST_SIZES = (3, 5, 1), (2, 0, 4)


def dict_clients(sizes, seed):
    """Per-client dict x (uint8 image, float meta) and float y [n] (regression)."""
    rng = np.random.default_rng(seed)
    xs = [
        {
            "image": rng.integers(1, 256, (n, 2, 2, 3), dtype=np.uint8),
            "meta": rng.normal(size=(n, 4)).astype(np.float32) + 10,
        }
        for n in sizes
    ]
    ys = [rng.normal(size=n).astype(np.float32) + 10 for n in sizes]
    return xs, ys


def regression_data():
    train_xs, train_ys = dict_clients(TRAIN_SIZES, 0)
    test_xs, test_ys = dict_clients(TEST_SIZES, 1)
    data = from_client_arrays(train_xs, train_ys, test_xs, test_ys)
    return data, (train_xs, train_ys, test_xs, test_ys)


def test_dict_x_float_y_from_client_arrays_pads_with_zeros_and_round_trips():
    data, (train_xs, train_ys, test_xs, test_ys) = regression_data()
    assert data.num_classes is None and data.num_clients == 3
    assert data.train.x["image"].shape == (3, 5, 2, 2, 3)
    assert data.train.x["image"].dtype == np.uint8
    assert data.train.x["meta"].shape == (3, 5, 4) and data.train.x["meta"].dtype == np.float32
    assert data.train.y.shape == (3, 5) and data.train.y.dtype == np.float32
    assert data.train.n_max == 5 and data.test.n_max == 4
    for split, xs, ys in ((data.train, train_xs, train_ys), (data.test, test_xs, test_ys)):
        x, y = jax.device_get((split.x, split.y))
        for c, (xc, yc) in enumerate(zip(xs, ys, strict=True)):
            n = len(yc)
            for key in ("image", "meta"):
                np.testing.assert_array_equal(x[key][c, :n], xc[key])
                assert not np.any(x[key][c, n:])
            np.testing.assert_array_equal(y[c, :n], yc)
            assert not np.any(y[c, n:])
            got_x, got_y = split.client(c)
            assert set(got_x) == {"image", "meta"} and isinstance(got_y, np.ndarray)
            for key in ("image", "meta"):
                np.testing.assert_array_equal(got_x[key], xc[key])
                assert got_x[key].dtype == xc[key].dtype
            np.testing.assert_array_equal(got_y, yc)
    px, py = pooled_test(data)
    np.testing.assert_array_equal(px["meta"], np.concatenate([x["meta"] for x in test_xs]))
    np.testing.assert_array_equal(py, np.concatenate(test_ys))


def test_sample_x_is_client_zeros_first_examples():
    data, (train_xs, _, _, _) = regression_data()
    one = data.train.sample_x()
    assert one["image"].shape == (1, 2, 2, 3) and one["meta"].shape == (1, 4)
    two = data.train.sample_x(2)
    np.testing.assert_array_equal(np.asarray(two["meta"]), train_xs[0]["meta"][:2])
    plain = stack_clients([np.ones((3, 2))], [np.zeros(3, np.int32)])
    assert plain.sample_x().shape == (1, 2) and plain.n_max == 3


def test_tuple_x_and_multi_hot_and_tuple_y_keep_structure_and_dtypes():
    rng = np.random.default_rng(0)
    sizes = (4, 2)
    tokens = [rng.integers(0, 50, (n, 6)).astype(np.int64) for n in sizes]
    masks = [np.ones((n, 6), bool) for n in sizes]
    hot = [rng.integers(0, 2, (n, 3)).astype(bool) for n in sizes]
    ids = [rng.integers(0, 3, n) for n in sizes]  # int64: becomes int32
    arrays = stack_clients(
        list(zip(tokens, masks, strict=True)),
        [{"hot": h, "cls": i} for h, i in zip(hot, ids, strict=True)],
    )
    assert isinstance(arrays.x, tuple) and arrays.x[0].dtype == np.int32  # x64 off
    assert arrays.x[1].dtype == np.bool_ and arrays.x[1].shape == (2, 4, 6)
    assert arrays.y["hot"].dtype == np.bool_ and arrays.y["hot"].shape == (2, 4, 3)
    assert arrays.y["cls"].dtype == np.int32 and arrays.n_max == 4
    x, y = arrays.client(1)
    np.testing.assert_array_equal(x[0], tokens[1])
    np.testing.assert_array_equal(y["hot"], hot[1])
    check_client_labels(arrays, 3)  # not one integer array: nothing to check
    check_client_labels(arrays, 3, labels="cls")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        check_client_labels(arrays, 2, labels="cls")


def test_mismatched_rows_and_shapes_raise_naming_client_and_leaf():
    x = {"image": np.zeros((3, 2)), "meta": np.zeros((2, 4))}
    with pytest.raises(ValueError, match=r"client 1: x\['image'\] has 3 rows but x\['meta'\]"):
        stack_clients([{"image": np.zeros((2, 2)), "meta": np.zeros((2, 4))}, x], [[0, 1]] * 2)
    with pytest.raises(ValueError, match=r"client 0: x has 3 rows but y has 2"):
        stack_clients([np.zeros((3, 2))], [np.zeros(2)])
    other = {"image": np.zeros((2, 5)), "meta": np.zeros((2, 4))}
    good = {"image": np.zeros((2, 2)), "meta": np.zeros((2, 4))}
    with pytest.raises(ValueError, match=r"client 1: x\['image'\] has example shape"):
        stack_clients([good, other], [np.zeros(2)] * 2)
    with pytest.raises(ValueError, match="structure"):
        stack_clients([good, {"image": np.zeros((2, 2))}], [np.zeros(2)] * 2)
    with pytest.raises(ValueError, match=r"train client 0: x\['image'\] has 3 rows"):
        from_client_arrays([x], [np.zeros(3)], [good], [np.zeros(2)])


def test_class_ids_need_num_classes_and_are_range_checked():
    xs, _ = dict_clients((3, 2), 0)
    ys = [np.array([0, 1, 2]), np.array([1, 1])]
    with pytest.raises(ValueError, match="num_classes"):
        from_client_arrays(xs, ys, xs, ys)
    with pytest.raises(ValueError, match=r"train labels must lie in \[0, 2\)"):
        from_client_arrays(xs, ys, xs, ys, num_classes=2)
    pytree_ys = [{"cls": y, "w": y.astype(np.float32)} for y in ys]
    data = from_client_arrays(xs, pytree_ys, xs, pytree_ys, num_classes=3, labels="cls")
    assert data.train.y["cls"].dtype == np.int32 and data.train.y["w"].dtype == np.float32
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        from_client_arrays(xs, pytree_ys, xs, pytree_ys, num_classes=2, labels=lambda y: y["cls"])
    from_client_arrays(xs, pytree_ys, xs, pytree_ys, num_classes=2)  # no class ids: unchecked


def test_label_skew_with_labels_matches_class_id_skew():
    rng = np.random.default_rng(0)
    n_tr, n_te = 120, 40
    cls_tr, cls_te = rng.integers(0, 4, n_tr), rng.integers(0, 4, n_te)
    x_tr = {"a": rng.normal(size=(n_tr, 3)).astype(np.float32), "b": np.arange(n_tr)}
    x_te = {"a": rng.normal(size=(n_te, 3)).astype(np.float32), "b": np.arange(n_te)}
    hot_tr = np.eye(4, dtype=np.float32)[cls_tr]
    hot_te = np.eye(4, dtype=np.float32)[cls_te]
    kw = dict(num_classes=4, num_clients=3, alpha=0.5, seed=2, min_size=5)
    with pytest.raises(ValueError, match="label skew needs class ids: pass labels="):
        label_skew(x_tr, hot_tr, x_te, hot_te, **kw)
    with pytest.raises(ValueError, match="label skew needs class ids: pass labels="):
        label_skew(x_tr, hot_tr, x_te, hot_te, labels=cls_tr, **kw)  # test ids missing
    skew = label_skew(x_tr, hot_tr, x_te, hot_te, labels=cls_tr, test_labels=cls_te, **kw)
    ref = label_skew(x_tr["a"], cls_tr, x_te["a"], cls_te, **kw)
    for got, want in ((skew.train, ref.train), (skew.test, ref.test)):
        np.testing.assert_array_equal(got.n, want.n)
        np.testing.assert_array_equal(got.x["a"], want.x)
        np.testing.assert_array_equal(np.asarray(got.y).argmax(-1), want.y)  # padding: 0
    y_tr = {"cls": cls_tr, "hot": hot_tr}
    y_te = {"cls": cls_te, "hot": hot_te}
    by_key = label_skew(x_tr, y_tr, x_te, y_te, labels="cls", **kw)
    np.testing.assert_array_equal(by_key.train.y["cls"], ref.train.y)
    np.testing.assert_array_equal(by_key.test.y["hot"], skew.test.y)
    np.testing.assert_array_equal(by_key.train.x["b"], skew.train.x["b"])


def test_store_gather_data_with_dict_x_equals_per_leaf_gather():
    data, _ = regression_data()
    train = data.train
    ids, n_max = np.array([2, 0, 3]), 4  # id 3 == C: an empty slot, reads row 2
    for arrays in (train, to_host(train)):
        got = gather_data(arrays, ids, n_max)
        assert isinstance(got.x["image"], jax.Array)
        rows = np.array([2, 0, 2])
        host = jax.device_get(train)
        for key in ("image", "meta"):
            np.testing.assert_array_equal(got.x[key], host.x[key][rows, :n_max])
        np.testing.assert_array_equal(got.y, host.y[rows, :n_max])
        np.testing.assert_array_equal(got.n, [1, 3, 0])


def test_plain_arrays_build_what_a_direct_numpy_construction_does():
    """A plain-array builder: x keeps its dtype, labels int32, zero padding, as before."""
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (23, 2, 2, 1), dtype=np.uint8)
    y_tr = rng.integers(0, 3, 23)  # int64 labels
    x_te = rng.normal(size=(5, 2, 2, 1)).astype(np.float32)
    y_te = rng.integers(0, 3, 5)
    data = iid(x_tr, y_tr, x_te, y_te, num_classes=3, num_clients=4, seed=7)
    assert data.num_classes == 3
    for split, x, y, parts in (
        (data.train, x_tr, y_tr, iid_partition(23, 4, seed=7)),
        (data.test, x_te, y_te, iid_partition(5, 4, seed=8, allow_empty=True)),
    ):
        n_max = max(1, max(p.size for p in parts))
        want_x = np.zeros((4, n_max, *x.shape[1:]), x.dtype)
        want_y = np.zeros((4, n_max), np.int32)
        for c, p in enumerate(parts):
            want_x[c, : p.size], want_y[c, : p.size] = x[p], y[p]
        assert split.x.dtype == want_x.dtype and split.y.dtype == np.int32
        np.testing.assert_array_equal(split.x, want_x)
        np.testing.assert_array_equal(split.y, want_y)
        np.testing.assert_array_equal(split.n, [p.size for p in parts])
    # label_skew on plain arrays: the partition of the class ids themselves, as before.
    parts, props = dirichlet_partition_with_proportions(
        y_tr, 2, 1.0, min_size=3, seed=1, num_classes=3
    )
    skew = label_skew(
        x_tr, y_tr, x_te, y_te, num_classes=3, num_clients=2, alpha=1.0, seed=1, min_size=3
    )
    np.testing.assert_array_equal(skew.train.n, [p.size for p in parts])
    test_parts = partition_by_proportions(y_te, props, seed=2)
    np.testing.assert_array_equal(skew.test.n, [p.size for p in test_parts])
    for c, p in enumerate(parts):
        np.testing.assert_array_equal(skew.train.x[c, : p.size], x_tr[p])
    # an empty client's float64 np.array([]) does not turn int labels into floats
    mixed = stack_clients([np.zeros((2, 1)), np.zeros((0, 1))], [np.array([1, 2]), np.array([])])
    assert mixed.y.dtype == np.int32 and isinstance(mixed, ClientArrays)
