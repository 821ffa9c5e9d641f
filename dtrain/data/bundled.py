"""Data sets that ship inside packages (scikit-learn) or are generated on the fly."""

from __future__ import annotations

import numpy as np

from dtrain.data.base import Arrays


def _sklearn(file: str) -> Arrays:
    """One of scikit-learn's bundled sets, read from its file (dtrain.compat.sklearn: no scikit-learn import)."""
    from dtrain.compat.sklearn import load

    x, y = load(file)
    return Arrays(x.astype(np.float32), y, "classification", num_classes=int(y.max()) + 1)


def digits(image: bool = False) -> Arrays:
    """scikit-learn's 8x8 handwritten digits (1797 samples, 64 features, 10 classes); image: shape (1, 8, 8)."""
    arrays = _sklearn("digits.csv.gz")
    if image:
        arrays.x = arrays.x.reshape(-1, 1, 8, 8)
    return arrays


def breast_cancer() -> Arrays:
    """scikit-learn's Wisconsin breast cancer (569 samples, 30 features, 2 classes)."""
    return _sklearn("breast_cancer.csv")


def iris() -> Arrays:
    """scikit-learn's iris (150 samples, 4 features, 3 classes)."""
    return _sklearn("iris.csv")


def wine() -> Arrays:
    """scikit-learn's wine (178 samples, 13 features, 3 classes)."""
    return _sklearn("wine_data.csv")


def xor(n_samples: int = 400, noise: float = 0.1, seed: int = 0) -> Arrays:
    """Noisy XOR: points around the four corners of the unit square, label = x1 XOR x2."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(n_samples, 2))
    x = (bits + rng.normal(0, noise, size=bits.shape)).astype(np.float32)
    y = (bits[:, 0] ^ bits[:, 1]).astype(np.int64)
    return Arrays(x, y, "classification", num_classes=2)
