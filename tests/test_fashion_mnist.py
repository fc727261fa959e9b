"""Tests for the IDX reader/writer, the Fashion-MNIST loader and builders, and its config.

All data is tiny fake IDX files written to tmp_path; only the last test reads the real
Fashion-MNIST (Debian package ``dataset-fashion-mnist``) and is skipped where it is missing.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import hypothesis.extra.numpy as hnp
import jax
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments import registry, report, run
from experiments.configs import seed_fashion_mnist
from fedjax_bn import data as fbd
from fedjax_bn.data import (
    FASHION_MNIST_DIR,
    fashion_mnist_feature_shift,
    fashion_mnist_iid,
    fashion_mnist_label_skew,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from fedjax_bn.data.idx import idx_bytes

DTYPES = ("uint8", "int8", "int16", "int32", "float32", "float64")
STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
N_TRAIN, N_TEST = 90, 40
CONFIG = str(Path(run.__file__).parent / "configs" / "seed_fashion_mnist.py")


def tagged_images(n: int, offset: int) -> np.ndarray:
    """Random uint8 [n, 28, 28] images whose first two pixels encode ``offset + index``."""
    x = np.random.default_rng(offset).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    ids = offset + np.arange(n)
    x[:, 0, 0], x[:, 0, 1] = ids % 256, ids // 256
    return x


def image_ids(x: np.ndarray) -> np.ndarray:
    """The ids :func:`tagged_images` wrote, from uint8 [N, 28, 28, 1] images."""
    return x[:, 0, 0, 0].astype(np.int64) + 256 * x[:, 0, 1, 0].astype(np.int64)


def balanced_labels(n: int, seed: int) -> np.ndarray:
    """uint8 labels with every class 0..9 about equally often, shuffled."""
    return np.random.default_rng(seed).permutation(np.arange(n) % 10).astype(np.uint8)


def fake_dir(root: Path, *, gz: tuple[bool, ...] = (True,) * 4) -> Path:
    """A directory of the four Fashion-MNIST files (train ids 0.., test ids 1000..)."""
    root.mkdir(parents=True, exist_ok=True)
    arrays = (
        tagged_images(N_TRAIN, 0),
        balanced_labels(N_TRAIN, 1),
        tagged_images(N_TEST, 1000),
        balanced_labels(N_TEST, 2),
    )
    for stem, array, zipped in zip(STEMS, arrays, gz, strict=True):
        write_idx(root / (f"{stem}.gz" if zipped else stem), array, gzip=zipped)
    return root


def unpadded(x, y, n) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated real (unpadded) examples of all clients, as host arrays."""
    x, y, n = jax.device_get((x, y, n))
    return (
        np.concatenate([x[c, : n[c]] for c in range(len(n))]),
        np.concatenate([y[c, : n[c]] for c in range(len(n))]),
    )


# --- IDX -----------------------------------------------------------------------------------


@given(
    array=st.sampled_from(DTYPES).flatmap(
        lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    ),
    zipped=st.booleans(),
    big_endian=st.booleans(),
)
def test_idx_round_trip_is_bitwise(tmp_path, array, zipped, big_endian) -> None:
    source = array.astype(array.dtype.newbyteorder(">")) if big_endian else array
    out = read_idx(write_idx(tmp_path / "a.idx", source, gzip=zipped))
    assert out.dtype == array.dtype and out.shape == array.shape
    assert out.tobytes() == array.tobytes()  # bitwise, NaN payloads and -0.0 included
    assert out.flags.writeable


def test_idx_layout_is_the_mnist_one() -> None:
    # magic 0x00000803 (uint8, 3 dims), big-endian dims, then the values in C order.
    x = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)
    assert idx_bytes(x) == bytes.fromhex("00000803 00000001 00000002 00000003 000102030405")
    assert idx_bytes(np.array([258], np.int16)) == bytes.fromhex("00000b01 00000001 0102")


def test_gzip_is_detected_by_magic_bytes_not_name(tmp_path) -> None:
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    zipped_no_suffix = write_idx(tmp_path / "plain-name", x, gzip=True)
    plain_with_suffix = write_idx(tmp_path / "zipped-name.gz", x, gzip=False)
    assert zipped_no_suffix.read_bytes()[:2] == b"\x1f\x8b"
    np.testing.assert_array_equal(read_idx(zipped_no_suffix), x)
    np.testing.assert_array_equal(read_idx(plain_with_suffix), x)


GOOD = idx_bytes(np.arange(6, dtype=np.int16).reshape(2, 3))  # 16 header + 12 payload bytes
BAD_FILES = {
    "bad magic": (b"\x01\x00" + GOOD[2:], "bad magic number"),
    "unknown dtype code": (GOOD[:2] + b"\x0a" + GOOD[3:], "unknown IDX dtype code 0x0A"),
    "truncated payload": (GOOD[:-3], "needs 12 bytes, got 9"),
    "truncated header": (GOOD[:10], "truncated IDX header"),
    "trailing bytes": (GOOD + b"\x00\x00", "2 trailing bytes"),
    "zero dims": (b"\x00\x00\x08\x00", "0 dimensions"),
}


@pytest.mark.parametrize("zipped", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_idx_file_errors_name_the_file_and_the_fault(tmp_path, case, zipped) -> None:
    data, expected = BAD_FILES[case]
    path = tmp_path / f"broken-{case.replace(' ', '_')}"
    path.write_bytes(gzip.compress(data) if zipped else data)
    with pytest.raises(ValueError, match=expected) as err:
        read_idx(path)
    assert str(path) in str(err.value)


def test_corrupt_gzip_names_the_file(tmp_path) -> None:
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(GOOD)[:-6])
    with pytest.raises(ValueError, match="corrupt gzip") as err:
        read_idx(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "array, match",
    [(np.zeros(3, np.int64), "cannot store dtype int64"), (np.array(1, np.uint8), "dimensions")],
)
def test_write_idx_rejects_what_idx_cannot_hold(tmp_path, array, match) -> None:
    with pytest.raises(ValueError, match=match):
        write_idx(tmp_path / "x", array)


# --- loader --------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [(True,) * 4, (False,) * 4, (True, False, False, True)])
def test_load_fashion_mnist_shapes_dtypes_and_values(tmp_path, gz) -> None:
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(fake_dir(tmp_path, gz=gz))
    assert x_tr.shape == (N_TRAIN, 28, 28, 1) and x_te.shape == (N_TEST, 28, 28, 1)
    assert x_tr.dtype == x_te.dtype == np.uint8
    assert y_tr.dtype == y_te.dtype == np.int32
    np.testing.assert_array_equal(x_tr[..., 0], tagged_images(N_TRAIN, 0))
    np.testing.assert_array_equal(y_te, balanced_labels(N_TEST, 2))


def test_missing_files_say_how_to_get_them(tmp_path) -> None:
    data_dir = fake_dir(tmp_path / "d")
    (data_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_fashion_mnist(data_dir)
    message = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "missing" in message and "t10k-labels-idx1-ubyte[.gz]." in message
    assert str(data_dir) in message and "data_dir" in message
    assert all(stem in message for stem in STEMS)  # the names looked for
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_mismatched_counts_bad_labels_and_shapes_are_rejected(tmp_path) -> None:
    data_dir = fake_dir(tmp_path)
    labels = data_dir / "train-labels-idx1-ubyte.gz"
    write_idx(labels, balanced_labels(N_TRAIN - 1, 1), gzip=True)
    with pytest.raises(ValueError, match=f"{N_TRAIN} images but .* {N_TRAIN - 1} labels"):
        load_fashion_mnist(data_dir)
    write_idx(labels, np.full(N_TRAIN, 10, np.uint8), gzip=True)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        load_fashion_mnist(data_dir)
    write_idx(labels, balanced_labels(N_TRAIN, 1), gzip=True)
    write_idx(data_dir / "t10k-images-idx3-ubyte.gz", np.zeros((N_TEST, 32, 32), np.uint8))
    with pytest.raises(ValueError, match=r"t10k-images.*shape \[N, 28, 28\]"):
        load_fashion_mnist(data_dir)


def test_max_train_keeps_a_seeded_random_subset(tmp_path) -> None:
    data_dir = fake_dir(tmp_path)
    x, y, x_te, _ = load_fashion_mnist(data_dir, max_train=30, max_test=7)
    assert (len(x), len(y), len(x_te)) == (30, 30, 7)
    ids = image_ids(x)
    assert np.all(np.diff(ids) > 0) and ids.max() < N_TRAIN  # distinct, in file order
    np.testing.assert_array_equal(y, balanced_labels(N_TRAIN, 1)[ids])
    again = load_fashion_mnist(data_dir, max_train=30)[0]
    other = load_fashion_mnist(data_dir, max_train=30, subset_seed=1)[0]
    np.testing.assert_array_equal(image_ids(again), ids)
    assert not np.array_equal(image_ids(other), ids)
    for bad in (0, N_TRAIN + 1):
        with pytest.raises(ValueError, match=f"max_train must be in \\[1, {N_TRAIN}\\]"):
            load_fashion_mnist(data_dir, max_train=bad)


# --- builders ------------------------------------------------------------------------------


@pytest.mark.parametrize("build", ["label_skew", "iid"])
def test_builders_cover_every_example_once(tmp_path, build) -> None:
    data_dir = fake_dir(tmp_path)
    if build == "label_skew":
        data = fashion_mnist_label_skew(3, 0.5, seed=1, min_size=5, data_dir=data_dir)
    else:
        data = fashion_mnist_iid(3, seed=1, data_dir=data_dir)
    assert data.num_clients == 3 and data.num_classes == 10
    assert data.train.x.dtype == np.uint8 and data.train.x.shape[2:] == (28, 28, 1)
    x, y = unpadded(data.train.x, data.train.y, data.train.n)
    np.testing.assert_array_equal(np.sort(image_ids(x)), np.arange(N_TRAIN))
    np.testing.assert_array_equal(y, balanced_labels(N_TRAIN, 1)[image_ids(x)])
    x_te, _ = unpadded(data.test.x, data.test.y, data.test.n)
    np.testing.assert_array_equal(np.sort(image_ids(x_te)), 1000 + np.arange(N_TEST))


def test_feature_shift_gives_each_client_its_domain_as_floats(tmp_path) -> None:
    data = fashion_mnist_feature_shift(3, seed=0, data_dir=fake_dir(tmp_path), max_train=60)
    assert data.domains == ("identity", "invert", "low_contrast")
    assert data.train.x.dtype == np.float32 and int(data.train.n.sum()) == 60
    x, n = jax.device_get((data.train.x, data.train.n))
    assert x.min() >= 0.0 and x.max() <= 1.0
    low = x[2, : n[2]]
    assert low.min() >= 0.3 - 1e-6 and low.max() <= 0.7 + 1e-6
    # client 0 is the source domain: its images are the loaded ones divided by 255.
    full_x, _, _, _ = load_fashion_mnist(tmp_path, max_train=60)
    ids = x[0, : n[0], 0, 0, 0] * 255 + 256 * 255 * x[0, : n[0], 0, 1, 0]
    by_id = {int(i): img for i, img in zip(image_ids(full_x), full_x, strict=True)}
    for i, img in zip(np.rint(ids).astype(int), x[0, : n[0]], strict=True):
        np.testing.assert_allclose(img, by_id[i] / 255.0, atol=1e-6)


# --- registry and config -------------------------------------------------------------------


def test_config_is_the_reported_setting_on_a_documented_subset() -> None:
    c = seed_fashion_mnist.get_config()
    assert (c.data.num_clients, c.data.alpha, c.data.max_train, c.data.max_test) == (
        10,
        0.5,
        12000,
        0,
    )
    assert (c.optim.name, c.optim.lr, c.optim.weight_decay) == ("adam", 5e-4, 1e-4)
    assert (c.rounds, c.mu, c.batch_size, c.local_epochs) == (75, 1e-3, 32, 1)
    assert (c.model.name, tuple(c.model.widths), c.model.hidden) == ("seed_cnn", (32, 64), 128)
    assert tuple(c.settings) == ("fashion_mnist_label_skew",)
    assert set(c.algorithms) == {"fedprox_bn_eval", "fedprox", "fedavg", "fedbn", "fedbn_prox"}
    for name in ("fashion_mnist_label_skew", "fashion_mnist_iid", "fashion_mnist_feature_shift"):
        assert name in registry.SETTINGS


@pytest.mark.parametrize(
    "setting", ["fashion_mnist_label_skew", "fashion_mnist_iid", "fashion_mnist_feature_shift"]
)
def test_registry_builds_settings_from_config_data(tmp_path, setting) -> None:
    c = seed_fashion_mnist.get_config()
    c.data.data_dir, c.data.num_clients, c.data.min_size = str(fake_dir(tmp_path)), 3, 2
    c.data.max_train, c.data.max_test = 45, 0
    data = registry.build_setting(setting, c, seed=0)
    assert data.num_clients == 3 and int(data.train.n.sum()) == 45
    assert int(data.test.n.sum()) == N_TEST


def test_empty_data_dir_means_the_default_dir(tmp_path, monkeypatch) -> None:
    c = seed_fashion_mnist.get_config()
    c.data.max_train = 0  # all of the fake train set
    absent = str(tmp_path / "absent-default")
    monkeypatch.setattr(fbd, "FASHION_MNIST_DIR", absent)  # the name the registry reads
    with pytest.raises(FileNotFoundError, match="absent-default"):
        registry.build_setting("fashion_mnist_iid", c, seed=0)
    monkeypatch.setattr(fbd, "FASHION_MNIST_DIR", str(fake_dir(tmp_path / "default")))
    assert registry.build_setting("fashion_mnist_iid", c, seed=0).num_clients == 10


def test_shrunk_seed_run_on_fake_fashion_mnist(tmp_path) -> None:
    out = tmp_path / "out"
    argv = [
        "run",
        f"--config={CONFIG}",
        f"--config.out_dir={out}",
        f"--config.data.data_dir={fake_dir(tmp_path / 'data')}",
        "--config.data.max_train=60",
        "--config.rounds=2",
        "--config.eval_every=1",
        "--config.algorithms=fedprox_bn_eval,fedbn_prox",
        "--config.data.num_clients=3",
        "--config.data.min_size=2",
        "--config.model.widths=(4,)",
        "--config.model.hidden=8",
        "--config.monitor.probe_size=8",
        "--config.eval_batch_size=64",
        "--config.compilation_cache=",
        "--config.progress=False",
    ]
    assert run.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["results"]["fashion_mnist_label_skew"]) == {"fedprox_bn_eval", "fedbn_prox"}
    path = report.history_path(out, "fashion_mnist_label_skew", "fedbn_prox", 0)
    rows = report.read_history(path)
    assert [r["round"] for r in rows] == [1, 2]


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR).is_dir(), reason="apt-get install dataset-fashion-mnist"
)
def test_real_fashion_mnist_from_the_debian_package() -> None:
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    assert x_tr.shape == (60000, 28, 28, 1) and x_te.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(y_tr), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(y_te), np.full(10, 1000))
    assert len(load_fashion_mnist(max_train=12000)[1]) == 12000
