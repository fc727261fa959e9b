"""Image classification data sets from tensorflow-datasets, as uint8 NHWC arrays or FederatedData.

Reading needs no TensorFlow: examples come from ``builder.as_data_source`` (what
``tfds.data_source`` returns: random access over prepared ArrayRecord files), read in bulk.
Data prepared as TFRecord is read with TensorFlow (``builder.as_dataset``, what ``tfds.load``
returns) when it is installed. Nothing here downloads or prepares: a data set that is not
prepared raises ``DatasetNotPreparedError`` saying how to get it. Decoded splits are cached as
``<data_dir>/fedjax_bn_cache/<name>/<version>/<split>.npz`` so later loads take a fraction of a
second. ``tensorflow_datasets`` is imported lazily, so ``import fedjax_bn.data`` works without it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fedjax_bn.data.builders import iid, label_skew
from fedjax_bn.data.federated import FederatedData

CACHE_DIR = "fedjax_bn_cache"
_CHUNK = 4096  # examples per bulk read: bounds the decoded dicts alive at once

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]


class DatasetNotPreparedError(FileNotFoundError):
    """A tensorflow-datasets data set is not prepared under the data_dir (nothing downloads)."""


def _import_tfds() -> Any:
    """Imports tensorflow_datasets, or raises ImportError saying what to install."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as err:
        raise ImportError(
            "reading tensorflow-datasets data sets needs the package tensorflow-datasets: "
            'pip install -e ".[tfds]" (or pip install tensorflow-datasets). Reading prepared '
            "ArrayRecord data needs no TensorFlow; only preparing it does."
        ) from err
    return tfds


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _archive_names(tfds: Any, builder: Any) -> list[str]:
    """File names of the original downloads (for manual_dir), from the tfds checksums."""
    try:
        return sorted({i.filename for i in (builder.url_infos or {}).values() if i.filename})
    except Exception:  # url_infos needs importlib_resources on some installs
        pass
    candidates = [Path(tfds.__file__).parent / "url_checksums" / f"{builder.name}.txt"]
    with contextlib.suppress(TypeError, OSError):
        candidates.append(Path(inspect.getfile(type(builder))).parent / "checksums.tsv")
    for path in candidates:
        if path.is_file():
            rows = (line.split("\t") for line in path.read_text().splitlines())
            return sorted({r[3].strip() for r in rows if len(r) >= 4 and r[3].strip()})
    return []


def not_prepared_message(tfds: Any, builder: Any) -> str:
    """What to do when ``builder``'s data is missing: prepare elsewhere, or from manual_dir."""
    name, root = builder.name, os.fspath(builder.data_dir_root)
    manual = os.path.join(root, "downloads", "manual")
    archives = ", ".join(_archive_names(tfds, builder)) or "the original archive(s)"
    return (
        f"tensorflow-datasets data set {builder.info.full_name!r} is not prepared in "
        f"data_dir={root!r} (no prepared data at {builder.data_dir}); fedjax_bn never "
        "downloads. data_dir=None means $TFDS_DATA_DIR or ~/tensorflow_datasets. Either:\n"
        "  1. On a machine with internet, prepare it as ArrayRecord (preparing needs "
        "TensorFlow: pip install tensorflow tensorflow-datasets importlib_resources):\n"
        f"       tfds build {name} --data_dir={root} --file_format=array_record\n"
        "     or in Python:\n"
        f"       tfds.builder({name!r}, data_dir={root!r}, "
        "file_format='array_record').download_and_prepare()\n"
        f"     then copy the folder {os.path.join(root, name)} to the same place on this "
        "machine (or pass data_dir= where you put it).\n"
        f"  2. Without internet: place {archives} in {manual} (the default manual_dir) and run "
        "the same command on this machine (it still needs TensorFlow).\n"
        'Reading prepared ArrayRecord data needs no TensorFlow: pip install -e ".[tfds]".'
    )


def _tfrecord_message(builder: Any) -> str:
    name, root = builder.name, os.fspath(builder.data_dir_root)
    return (
        f"{builder.info.full_name!r} in {builder.data_dir} is stored as "
        f"{builder.info.file_format}, which only TensorFlow reads. Either pip install "
        "tensorflow, or convert it to ArrayRecord where TensorFlow is installed:\n"
        f"  tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record\n"
        f"or prepare it again into an empty data_dir: tfds build {name} --data_dir=<new dir> "
        f"--file_format=array_record, and copy it to {root}. Reading ArrayRecord needs no "
        "TensorFlow."
    )


def _spec(info: Any, label_key: str | None) -> tuple[str, str, tuple[int, ...], int]:
    """(image_key, label_key, image shape, num_classes) from the builder info."""
    keys = info.supervised_keys
    pair = keys if isinstance(keys, tuple) and len(keys) == 2 else ("image", "label")
    image_key = pair[0] if isinstance(pair[0], str) else "image"
    label_key = label_key or (pair[1] if isinstance(pair[1], str) else "label")
    features = info.features
    for key in (image_key, label_key):
        if key not in features:
            raise ValueError(
                f"{info.full_name!r} has no feature {key!r} (features: {list(features)}); "
                "pass label_key= to choose the label feature."
            )
    image = features[image_key]
    shape = tuple(image.shape)
    if len(shape) != 3 or None in shape or np.dtype(image.np_dtype) != np.uint8:
        raise ValueError(
            f"{info.full_name!r}: feature {image_key!r} is {image!r}; need fixed-size uint8 "
            "images [H, W, C]."
        )
    num_classes = getattr(features[label_key], "num_classes", None)
    if not num_classes:
        raise ValueError(
            f"{info.full_name!r}: feature {label_key!r} is not a ClassLabel; pass label_key=."
        )
    return image_key, label_key, shape, int(num_classes)


def _read_source(
    source: Any, n: int, image_key: str, label_key: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` examples of a data source, read in bulk ``_CHUNK`` at a time."""
    x = np.empty((n, *shape), dtype=np.uint8)
    y = np.empty((n,), dtype=np.int32)
    for start in range(0, n, _CHUNK):
        keys = list(range(start, min(n, start + _CHUNK)))
        try:
            examples = source.__getitems__(keys)
        except TypeError:  # tfds.testing.mock_data's __getitems__ is unbound (tfds 4.9.10)
            examples = [source[k] for k in keys]
        for i, ex in enumerate(examples, start):
            x[i] = ex[image_key]
            y[i] = ex[label_key]
    return x, y


def _read_with_tensorflow(
    tfds: Any, builder: Any, split: str, image_key: str, label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """A whole TFRecord split via ``builder.as_dataset`` (needs TensorFlow, never downloads)."""
    if not _tensorflow_available():
        raise RuntimeError(_tfrecord_message(builder))
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    return np.asarray(ex[image_key], dtype=np.uint8), np.asarray(ex[label_key], dtype=np.int32)


def _cache_path(builder: Any, split: str, label_key: str) -> Path | None:
    root = os.fspath(builder.data_dir_root)
    if "://" in root:  # remote data_dir (gs://...): no cache
        return None
    digest = hashlib.sha1(f"{split}|{label_key}".encode()).hexdigest()[:8]
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", split)
    return Path(root, CACHE_DIR, builder.info.full_name, f"{stem}-{label_key}-{digest}.npz")


def _load_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError) as err:
        warnings.warn(f"ignoring unreadable cache {path}: {err}", stacklevel=3)
        return None
    return (x, y) if x.dtype == np.uint8 and len(x) == len(y) else None


def _save_cache(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(f, x=x, y=y)
        os.replace(tmp, path)
    except OSError as err:
        warnings.warn(f"could not write cache {path}: {err}", stacklevel=3)
        tmp.unlink(missing_ok=True)


def _load_split(
    tfds: Any,
    builder: Any,
    split: str,
    *,
    max_examples: int | None,
    label_key: str | None,
    cache: bool,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One split as (x [N, H, W, C] uint8, y [N] int32, num_classes); the first N examples."""
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}.")
    image_key, label_key, shape, num_classes = _spec(builder.info, label_key)
    prepared = builder.is_prepared()
    path = _cache_path(builder, split, label_key) if cache and prepared else None
    cached = _load_cache(path) if path is not None else None
    if cached is not None:
        x, y = cached
    else:
        try:
            source = builder.as_data_source(split=split)
        except Exception as err:
            if not prepared:
                raise DatasetNotPreparedError(not_prepared_message(tfds, builder)) from err
            if not isinstance(err, NotImplementedError):  # not a random-access format
                raise
            x, y = _read_with_tensorflow(tfds, builder, split, image_key, label_key)
        else:
            n = len(source) if max_examples is None else min(len(source), max_examples)
            x, y = _read_source(source, n, image_key, label_key, shape)
        if path is not None and (max_examples is None or len(y) < max_examples):
            _save_cache(path, x, y)
    x, y = x[:max_examples], y[:max_examples]
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{builder.info.full_name!r}: labels outside [0, {num_classes}).")
    return x, y, num_classes


def _builder(name: str, data_dir: str | os.PathLike | None) -> tuple[Any, Any]:
    tfds = _import_tfds()
    return tfds, tfds.builder(name, data_dir=None if data_dir is None else os.fspath(data_dir))


def _load(
    name: str,
    data_dir: str | os.PathLike | None,
    train_split: str,
    test_split: str,
    max_train: int | None,
    max_test: int | None,
    label_key: str | None,
    cache: bool,
) -> Arrays:
    tfds, builder = _builder(name, data_dir)
    kw = dict(label_key=label_key, cache=cache)
    x_tr, y_tr, k = _load_split(tfds, builder, train_split, max_examples=max_train, **kw)
    x_te, y_te, _ = _load_split(tfds, builder, test_split, max_examples=max_test, **kw)
    return x_tr, y_tr, x_te, y_te, k


def load_tfds(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    train_split: str = "train",
    test_split: str = "test",
    max_examples: int | None = None,
    label_key: str | None = None,
    cache: bool = True,
) -> Arrays:
    """Returns (x_train, y_train, x_test, y_test, num_classes) of a tfds image data set.

    Images are uint8 NHWC (models normalise them), labels int32 in [0, num_classes), with
    num_classes from the label feature (``label_key``, default the supervised label, e.g. the
    fine label of cifar100). ``max_examples`` keeps the first examples of each split (the
    prepared files are shuffled). Raises ``DatasetNotPreparedError`` if the data is missing.
    """
    return _load(
        name, data_dir, train_split, test_split, max_examples, max_examples, label_key, cache
    )


def tfds_label_skew(
    name: str,
    num_clients: int = 10,
    alpha: float = 0.5,
    *,
    seed: int = 0,
    min_size: int = 10,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    train_split: str = "train",
    test_split: str = "test",
    label_key: str | None = None,
    cache: bool = True,
) -> FederatedData:
    """A tfds data set with Dir(alpha) label skew over clients; see ``builders.label_skew``."""
    x_tr, y_tr, x_te, y_te, k = _load(
        name, data_dir, train_split, test_split, max_train, max_test, label_key, cache
    )
    return label_skew(
        x_tr,
        y_tr,
        x_te,
        y_te,
        num_classes=k,
        num_clients=num_clients,
        alpha=alpha,
        seed=seed,
        min_size=min_size,
    )


def tfds_iid(
    name: str,
    num_clients: int = 10,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_test: int | None = None,
    train_split: str = "train",
    test_split: str = "test",
    label_key: str | None = None,
    cache: bool = True,
) -> FederatedData:
    """A tfds data set split IID over clients; see ``builders.iid``."""
    x_tr, y_tr, x_te, y_te, k = _load(
        name, data_dir, train_split, test_split, max_train, max_test, label_key, cache
    )
    return iid(x_tr, y_tr, x_te, y_te, num_classes=k, num_clients=num_clients, seed=seed)
