"""scikit-learn's bundled data files, read without importing scikit-learn.

`sklearn.datasets` imports SciPy and pandas, which every process that trains on digits (each spawned rank, each
`dtrain train`) would otherwise pay for at start-up; the data itself is a few CSV files inside the package, which
numpy reads. Their place (sklearn/datasets/data/) and layout are scikit-learn's private details: `check()` (run by
tests/unit/test_compat.py) names a file that moved, and tests/unit/test_data.py compares every set with
scikit-learn's own loader.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
from pathlib import Path

import numpy as np

FILES = ("digits.csv.gz", "iris.csv", "wine_data.csv", "breast_cancer.csv")


def data_file(name: str) -> Path:
    """The path of one of scikit-learn's bundled data files (the package is located, not imported)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("scikit-learn is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / name


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(features as float64, integer targets) of a bundled file, as sklearn.datasets' loaders read it: digits is a
    headerless gzipped CSV whose last column is the target; the others have a header row (samples, features, class
    names) and one row per sample, target last."""
    path = data_file(name)
    gzipped = name.endswith(".gz")
    with (gzip.open(path, "rt") if gzipped else path.open(encoding="utf-8")) as f:
        header = None if gzipped else next(csv.reader([f.readline()]))
        table = np.loadtxt(f, delimiter=",", ndmin=2)
    if header is not None and table.shape != (int(header[0]), int(header[1]) + 1):
        raise ValueError(f"{path}: {table.shape[0]} rows of {table.shape[1]} values, its header says "
                         f"{header[0]} of {int(header[1]) + 1}")
    return table[:, :-1], table[:, -1].astype(np.int64)


def check() -> None:
    """CompatError naming each bundled data file that is no longer where it was."""
    from dtrain.compat import require

    require({f"sklearn/datasets/data/{name}": (lambda n=name: data_file(n).is_file() or None) for name in FILES})
