"""Tests for fedjax_bn.data.tfds: tensorflow-datasets sets, read without TensorFlow or network.

Two kinds of data, neither downloaded:
- ``tfds.testing.mock_data``: random examples shaped by the real builders' features. Its default
  policy (AUTO) finds no metadata files in the pip wheel and falls back to USE_CODE, which works
  without TensorFlow through ``as_data_source``; its ``__getitems__`` is unbound (tfds 4.9.10),
  so the loader falls back to one-by-one reads there.
- A tiny fake ``cifar100`` really prepared as ArrayRecord in a tmp data_dir by a subclass of the
  tfds builder that yields PNG bytes (encoding arrays would need TensorFlow): the real read path.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from PIL import Image  # noqa: E402  (a tensorflow-datasets dependency)
from tensorflow_datasets.image_classification import cifar  # noqa: E402

from fedjax_bn.data import (  # noqa: E402
    DatasetNotPreparedError,
    label_skew,
    load_tfds,
    pooled_test,
    tfds_iid,
    tfds_label_skew,
)

HAS_TF = importlib.util.find_spec("tensorflow") is not None
SIZES = {"train": 60, "test": 25}


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test; so does any download or preparation."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)


def _png(image: np.ndarray) -> io.BytesIO:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return io.BytesIO(buf.getvalue())


def _fake_examples(split: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(list(SIZES).index(split))
    n = SIZES[split]
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 100, n)


class Cifar100(cifar.Cifar100, skip_registration=True):
    """The real cifar100 builder (name, version, features), fed with a few fake examples."""

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SIZES}

    def _generate_examples(self, split):
        x, y = _fake_examples(split)
        for i in range(len(y)):
            label = int(y[i])
            example = {"id": f"{split}{i}", "image": _png(x[i]), "label": label}
            yield i, {**example, "coarse_label": label // 5}


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """A data_dir holding a prepared ArrayRecord ``cifar100/3.0.2`` (made without TensorFlow)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    Cifar100(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def _rows(x: np.ndarray, y: np.ndarray) -> list[tuple[bytes, int]]:
    """The examples as a sorted multiset of (image bytes, label)."""
    return sorted((xi.tobytes(), int(yi)) for xi, yi in zip(x, y, strict=True))


def _assert_no_tensorflow() -> None:
    if not HAS_TF:
        assert "tensorflow" not in sys.modules


# ---------------------------------------------------------------- mock_data


@pytest.mark.parametrize(
    "name, shape, classes",
    [
        ("cifar100", (32, 32, 3), 100),
        ("cifar10", (32, 32, 3), 10),
        ("mnist", (28, 28, 1), 10),
        ("fashion_mnist", (28, 28, 1), 10),
        ("svhn_cropped", (32, 32, 3), 10),
    ],
)
def test_mock_shapes_dtypes_labels(tmp_path, name, shape, classes):
    with tfds.testing.mock_data(num_examples=40):
        x_tr, y_tr, x_te, y_te, k = load_tfds(name, data_dir=tmp_path)
    assert k == classes
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        assert x.shape == (40, *shape) and x.dtype == np.uint8
        assert y.shape == (40,) and y.dtype == np.int32
        assert y.min() >= 0 and y.max() < classes
    assert len(np.unique(y_tr)) > 1
    assert not any(tmp_path.iterdir())  # mocked data is never cached
    _assert_no_tensorflow()


def test_mock_use_code_policy_and_max_examples(tmp_path):
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        x_tr, y_tr, x_te, y_te, k = load_tfds("cifar100", data_dir=tmp_path, max_examples=7)
    assert x_tr.shape == x_te.shape == (7, 32, 32, 3) and y_tr.shape == (7,) and k == 100


def test_mock_label_skew_covers_every_example_once(tmp_path):
    with tfds.testing.mock_data(num_examples=300):
        x, y, x_te, y_te, k = load_tfds("cifar100", data_dir=tmp_path)
        data = tfds_label_skew("cifar100", 5, 0.5, seed=3, min_size=5, data_dir=tmp_path)
    assert data.num_clients == 5 and data.num_classes == 100
    assert data.train.x.dtype == np.uint8 and data.train.y.dtype == np.int32
    n = np.asarray(data.train.n)
    assert n.sum() == 300 and n.min() >= 5
    tx, ty = np.asarray(data.train.x), np.asarray(data.train.y)
    union_x = np.concatenate([tx[c, : n[c]] for c in range(5)])
    union_y = np.concatenate([ty[c, : n[c]] for c in range(5)])
    assert _rows(union_x, union_y) == _rows(x, y)
    assert _rows(*pooled_test(data)) == _rows(x_te, y_te)
    # Same arrays and seed: the generic builder gives the same partition.
    ref = label_skew(x, y, x_te, y_te, num_classes=k, num_clients=5, alpha=0.5, seed=3, min_size=5)
    np.testing.assert_array_equal(np.asarray(ref.train.y), ty)


def test_mock_iid_sizes(tmp_path):
    with tfds.testing.mock_data(num_examples=50):
        data = tfds_iid("mnist", 4, data_dir=tmp_path, max_train=42, max_test=10)
    assert data.num_classes == 10 and data.train.x.shape[2:] == (28, 28, 1)
    assert sorted(np.asarray(data.train.n).tolist()) == [10, 10, 11, 11]
    assert int(np.asarray(data.test.n).sum()) == 10


# ---------------------------------------------------------------- real ArrayRecord files


def test_reads_prepared_array_record_without_tensorflow(prepared_dir):
    x_tr, y_tr, x_te, y_te, k = load_tfds("cifar100", data_dir=prepared_dir, cache=False)
    assert k == 100 and x_tr.dtype == np.uint8 and y_tr.dtype == np.int32
    assert _rows(x_tr, y_tr) == _rows(*_fake_examples("train"))
    assert _rows(x_te, y_te) == _rows(*_fake_examples("test"))
    assert not (prepared_dir / "fedjax_bn_cache").exists()
    _, y_coarse, _, _, k_coarse = load_tfds(
        "cifar100", data_dir=prepared_dir, label_key="coarse_label", cache=False
    )
    assert k_coarse == 20
    np.testing.assert_array_equal(y_coarse, y_tr // 5)
    _assert_no_tensorflow()


def test_cache_is_written_then_read(prepared_dir, monkeypatch):
    first = load_tfds("cifar100", data_dir=prepared_dir)
    files = sorted((prepared_dir / "fedjax_bn_cache" / "cifar100" / "3.0.2").glob("*.npz"))
    assert len(files) == 2

    def unreadable(*args, **kwargs):
        raise AssertionError("read the files although the cache holds the split")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", unreadable)
    second = load_tfds("cifar100", data_dir=prepared_dir)
    for a, b in zip(first[:4], second[:4], strict=True):
        np.testing.assert_array_equal(a, b)
    small = load_tfds("cifar100", data_dir=prepared_dir, max_examples=9)
    np.testing.assert_array_equal(small[0], first[0][:9])
    np.testing.assert_array_equal(small[3], first[3][:9])


def test_label_skew_on_prepared_files(prepared_dir):
    data = tfds_label_skew("cifar100", 3, 1.0, min_size=5, data_dir=prepared_dir, cache=False)
    assert int(np.asarray(data.train.n).sum()) == SIZES["train"]
    assert int(np.asarray(data.test.n).sum()) == SIZES["test"]
    assert data.train.x.shape[2:] == (32, 32, 3) and data.train.x.dtype == np.uint8


@pytest.mark.skipif(HAS_TF, reason="with TensorFlow installed TFRecord data is readable")
def test_tfrecord_without_tensorflow_says_what_to_do(prepared_dir, tmp_path):
    shutil.copytree(prepared_dir / "cifar100", tmp_path / "cifar100")
    info_path = tmp_path / "cifar100" / "3.0.2" / "dataset_info.json"
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(RuntimeError) as err:
        load_tfds("cifar100", data_dir=tmp_path)
    msg = str(err.value)
    assert "pip install tensorflow" in msg and "--out_file_format=array_record" in msg


# ---------------------------------------------------------------- errors


def test_not_prepared_raises_with_instructions(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as err:
        load_tfds("cifar100", data_dir=tmp_path)
    msg = str(err.value)
    for part in (
        f"tfds build cifar100 --data_dir={tmp_path} --file_format=array_record",
        "download_and_prepare()",
        "pip install tensorflow",
        'pip install -e ".[tfds]"',
        "cifar-100-binary.tar.gz",
        str(tmp_path / "downloads" / "manual"),
    ):
        assert part in msg, part
    assert isinstance(err.value, FileNotFoundError)
    assert not any(tmp_path.iterdir())  # nothing written, nothing downloaded


def test_missing_tensorflow_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e \"\.\[tfds\]\""):
        load_tfds("cifar100")


def test_import_does_not_need_tensorflow_datasets():
    code = "import sys, fedjax_bn.data; assert 'tensorflow_datasets' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
