"""Data sets that ship inside packages (scikit-learn) or are generated on the fly."""

from __future__ import annotations

import numpy as np

from dtrain.data.base import Arrays


def _sklearn(loader_name: str) -> Arrays:
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, loader_name)()
    x, y = bunch.data.astype(np.float32), bunch.target.astype(np.int64)
    return Arrays(x, y, "classification", num_classes=int(y.max()) + 1)


def digits(image: bool = False) -> Arrays:
    """scikit-learn's 8x8 handwritten digits (1797 samples, 64 features, 10 classes); image: shape (1, 8, 8)."""
    arrays = _sklearn("load_digits")
    if image:
        arrays.x = arrays.x.reshape(-1, 1, 8, 8)
    return arrays


def breast_cancer() -> Arrays:
    """scikit-learn's Wisconsin breast cancer (569 samples, 30 features, 2 classes)."""
    return _sklearn("load_breast_cancer")


def iris() -> Arrays:
    """scikit-learn's iris (150 samples, 4 features, 3 classes)."""
    return _sklearn("load_iris")


def wine() -> Arrays:
    """scikit-learn's wine (178 samples, 13 features, 3 classes)."""
    return _sklearn("load_wine")


def xor(n_samples: int = 400, noise: float = 0.1, seed: int = 0) -> Arrays:
    """Noisy XOR: points around the four corners of the unit square, label = x1 XOR x2."""
    rng = np.random.default_rng(seed)
    bits = rng.integers(0, 2, size=(n_samples, 2))
    x = (bits + rng.normal(0, noise, size=bits.shape)).astype(np.float32)
    y = (bits[:, 0] ^ bits[:, 1]).astype(np.int64)
    return Arrays(x, y, "classification", num_classes=2)
