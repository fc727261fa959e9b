"""Fashion-MNIST from local IDX files (e.g. the Debian package ``dataset-fashion-mnist``).

Nothing downloads: the four standard files are read from ``data_dir`` (default
``/usr/share/datasets/fashion-mnist``, where ``apt-get install dataset-fashion-mnist`` puts
them), gzipped or not. Any directory of MNIST-format IDX files with 28x28 images and 10 classes
works the same way (MNIST, KMNIST). Images stay uint8 NHWC until the model turns them into
floats; only the feature-shift builder converts them (its domains work on floats in [0, 1]).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fedjax_bn.data.builders import feature_shift, iid, label_skew
from fedjax_bn.data.federated import FederatedData
from fedjax_bn.data.idx import read_idx

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
NUM_FASHION_MNIST_CLASSES = 10
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SHAPE = (28, 28)
# Split -> (images file, labels file), each looked for as-is and with ".gz".
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _find(data_dir: Path, stem: str) -> Path | None:
    """``data_dir/stem`` or ``data_dir/stem.gz``, whichever exists first; None if neither."""
    for name in (stem, f"{stem}.gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _missing_message(data_dir: Path, missing: list[str]) -> str:
    looked_for = ", ".join(f"{s}[.gz]" for pair in FILES.values() for s in pair)
    return (
        f"Fashion-MNIST files missing in data_dir={str(data_dir)!r}: "
        f"{', '.join(f'{s}[.gz]' for s in missing)}. Install them with "
        "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu; files land in "
        f"{FASHION_MNIST_DIR}), or point data_dir at a directory of MNIST-format IDX files "
        f"named {looked_for} (gzipped or not)."
    )


def fashion_mnist_files(data_dir: str | os.PathLike[str] = FASHION_MNIST_DIR) -> dict[str, Path]:
    """The paths of the four files, keyed ``train_images`` ... ``test_labels``.

    Raises FileNotFoundError saying how to get them when any is missing.
    """
    root = Path(data_dir).expanduser()
    found, missing = {}, []
    for split, (images, labels) in FILES.items():
        for kind, stem in (("images", images), ("labels", labels)):
            path = _find(root, stem)
            if path is None:
                missing.append(stem)
            found[f"{split}_{kind}"] = path
    if missing:
        raise FileNotFoundError(_missing_message(root, missing))
    return found


def _read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, 28, 28, 1] uint8, y [N] int32) of one split, checked for shape and labels."""
    x, y = read_idx(images_path), read_idx(labels_path)
    if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
        raise ValueError(
            f"{images_path}: expected uint8 images of shape [N, 28, 28], got {x.dtype.name} "
            f"{x.shape}."
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{labels_path}: expected 1-D integer labels, got {y.dtype.name} {y.shape}."
        )
    if len(x) != len(y):
        raise ValueError(f"{images_path} holds {len(x)} images but {labels_path} {len(y)} labels.")
    if y.size and (y.min() < 0 or y.max() >= NUM_FASHION_MNIST_CLASSES):
        raise ValueError(
            f"{labels_path}: labels must lie in [0, {NUM_FASHION_MNIST_CLASSES}), found "
            f"[{y.min()}, {y.max()}]."
        )
    return x[..., None], y.astype(np.int32)


def _subset(
    x: np.ndarray, y: np.ndarray, max_examples: int | None, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """A uniform random subset of ``max_examples`` (in file order), or all if None."""
    if max_examples is None:
        return x, y
    if not 1 <= max_examples <= len(y):
        raise ValueError(
            f"max_{what} must be in [1, {len(y)}] (the {what} examples there are) or None for "
            f"all, got {max_examples}."
        )
    keep = np.sort(np.random.default_rng(seed).choice(len(y), size=max_examples, replace=False))
    return x[keep], y[keep]


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] = FASHION_MNIST_DIR,
    *,
    max_train: int | None = None,
    max_test: int | None = None,
    subset_seed: int = 0,
) -> Arrays:
    """Returns (x_train, y_train, x_test, y_test): uint8 ``[N, 28, 28, 1]``, int32 labels 0..9.

    The full data has 60,000 train and 10,000 test images. ``max_train`` / ``max_test`` keep a
    uniform random subset of that many (drawn with ``subset_seed``, independent of any
    partition seed, so every experiment seed sees the same subset; kept in file order).
    Raises FileNotFoundError when files are missing, ValueError when they are malformed.
    """
    paths = fashion_mnist_files(data_dir)
    x_tr, y_tr = _read_split(paths["train_images"], paths["train_labels"])
    x_te, y_te = _read_split(paths["test_images"], paths["test_labels"])
    x_tr, y_tr = _subset(x_tr, y_tr, max_train, subset_seed, "train")
    x_te, y_te = _subset(x_te, y_te, max_test, subset_seed + 1, "test")
    return x_tr, y_tr, x_te, y_te


def fashion_mnist_label_skew(
    num_clients: int = 10,
    alpha: float = 0.5,
    *,
    seed: int = 0,
    min_size: int = 10,
    data_dir: str | os.PathLike[str] = FASHION_MNIST_DIR,
    max_train: int | None = None,
    max_test: int | None = None,
) -> FederatedData:
    """Fashion-MNIST (uint8) with Dir(alpha) label skew; see ``builders.label_skew``."""
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(data_dir, max_train=max_train, max_test=max_test)
    return label_skew(
        x_tr,
        y_tr,
        x_te,
        y_te,
        num_classes=NUM_FASHION_MNIST_CLASSES,
        num_clients=num_clients,
        alpha=alpha,
        seed=seed,
        min_size=min_size,
    )


def fashion_mnist_iid(
    num_clients: int = 10,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike[str] = FASHION_MNIST_DIR,
    max_train: int | None = None,
    max_test: int | None = None,
) -> FederatedData:
    """Fashion-MNIST (uint8) split IID over clients; see ``builders.iid``."""
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(data_dir, max_train=max_train, max_test=max_test)
    return iid(
        x_tr,
        y_tr,
        x_te,
        y_te,
        num_classes=NUM_FASHION_MNIST_CLASSES,
        num_clients=num_clients,
        seed=seed,
    )


def fashion_mnist_feature_shift(
    num_clients: int = 10,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike[str] = FASHION_MNIST_DIR,
    max_train: int | None = None,
    max_test: int | None = None,
) -> FederatedData:
    """Fashion-MNIST split IID, client c's images in domain ``domain_for_client(c)``.

    The uint8 images are divided by 255 first (the domains work on floats in [0, 1]), so the
    clients hold float32 images, 4x the memory of the other builders. See
    ``builders.feature_shift``.
    """
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(data_dir, max_train=max_train, max_test=max_test)
    return feature_shift(
        x_tr.astype(np.float32) / 255.0,
        y_tr,
        x_te.astype(np.float32) / 255.0,
        y_te,
        num_classes=NUM_FASHION_MNIST_CLASSES,
        num_clients=num_clients,
        seed=seed,
    )
