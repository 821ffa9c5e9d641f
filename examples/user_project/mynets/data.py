"""A data set by import path: a function returning dtrain.data.Arrays; its keyword arguments are data.options."""

from __future__ import annotations

import numpy as np

from dtrain.data import Arrays


def spirals(n: int = 600, noise: float = 0.1, seed: int = 0) -> Arrays:
    """Two interleaved spirals in the plane, a binary classification problem no linear model solves."""
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.05, 1.0, n)) * 3 * np.pi
    label = rng.integers(0, 2, n)
    sign = np.where(label == 0, 1.0, -1.0)
    x = np.stack([sign * t * np.cos(t), sign * t * np.sin(t)], axis=1) / (3 * np.pi)
    x += rng.normal(scale=noise, size=x.shape)
    return Arrays(x.astype(np.float32), label.astype(np.int64), "classification", num_classes=2)
