"""Feature-shift domains mimicking FedBN's multi-domain digits.

Each transform maps float NHWC images in [0, 1] to float32 images of the same shape in [0, 1].
Every transform takes an ``rng`` so that stochastic ones (``noise``) are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _as_images(x: np.ndarray) -> np.ndarray:
    """Checks for NHWC input and returns it as float32."""
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected NHWC images with 4 dims, got shape {x.shape}.")
    return x.astype(np.float32, copy=False)


def _finish(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)


def identity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The source domain, unchanged."""
    return _finish(_as_images(x).copy())


def invert(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Negative images: 1 - x."""
    return _finish(1.0 - _as_images(x))


def low_contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Squashes intensities into [0.3, 0.7]."""
    return _finish(0.3 + 0.4 * _as_images(x))


def noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Adds Gaussian noise with std 0.2, then clips to [0, 1]."""
    x = _as_images(x)
    return _finish(x + rng.normal(0.0, 0.2, size=x.shape).astype(np.float32))


def rotate90(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rotates each image by 90 degrees; needs square images to keep the shape."""
    x = _as_images(x)
    if x.shape[1] != x.shape[2]:
        raise ValueError(f"rotate90 needs square images (H == W), got shape {x.shape}.")
    return _finish(np.rot90(x, k=1, axes=(1, 2)))


def flip(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors each image left-right."""
    return _finish(_as_images(x)[:, :, ::-1, :])


def blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """3x3 box blur with edge padding."""
    x = _as_images(x)
    h, w = x.shape[1], x.shape[2]
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3))
    return _finish(out / 9.0)


def gamma(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightens mid-tones: x ** 0.4."""
    return _finish(np.power(np.clip(_as_images(x), 0.0, 1.0), 0.4))


DOMAINS: dict[str, Transform] = {
    "identity": identity,
    "invert": invert,
    "low_contrast": low_contrast,
    "noise": noise,
    "rotate90": rotate90,
    "flip": flip,
    "blur": blur,
    "gamma": gamma,
}


def domain_for_client(client: int) -> str:
    """The domain name of ``client``, cycling through ``DOMAINS`` in order."""
    if client < 0:
        raise ValueError(f"client must be >= 0, got {client}.")
    names = list(DOMAINS)
    return names[client % len(names)]


def apply_domain(x: np.ndarray, name: str, *, seed: int) -> np.ndarray:
    """Applies domain ``name`` to images ``x`` with a generator seeded by ``seed``."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; valid names are {list(DOMAINS)}.")
    return DOMAINS[name](x, np.random.default_rng(seed))
