"""The scikit-learn digits data set (bundled with sklearn, no download) as NHWC arrays.

scikit-learn is imported when the digits are loaded, not with ``fedjax_bn`` (it costs seconds).
"""

from __future__ import annotations

import numpy as np


def load_digits(
    *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (x_train, y_train, x_test, y_test) of the 8x8 digits, split stratified by label.

    Images are float32 NHWC ``[N, 8, 8, 1]`` in [0, 1] (raw values 0..16 divided by 16);
    labels are int32 in 0..9. The split is fixed by ``seed`` so experiments are repeatable.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}; pick e.g. 0.2.")
    import sklearn.datasets
    from sklearn.model_selection import train_test_split

    bunch = sklearn.datasets.load_digits()
    x = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[..., None]
    y = np.asarray(bunch.target, dtype=np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test
