"""The two shapes data takes: a loader's raw arrays, and the split tensors the engine trains on."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from dtrain.models.base import DataMeta


@dataclass
class Arrays:
    """What a loader returns: features x, targets y (None when unsupervised), and optionally fixed splits."""

    x: np.ndarray
    y: np.ndarray | None
    task: str
    num_classes: int = 0
    split: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None
    """Predefined {"train": (x, y), "test": (x, y)} splits (e.g. MNIST); None splits x, y by fraction."""
    period: int | None = None
    shuffle_split: bool = True
    """False keeps the order (time series: test is the most recent data)."""


@dataclass
class DataBundle:
    """Train/val/test tensors (tuples of equal-length tensors) plus what a model needs to know."""

    train: tuple[Tensor, ...]
    val: tuple[Tensor, ...]
    test: tuple[Tensor, ...]
    meta: DataMeta
