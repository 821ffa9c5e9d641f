"""Synthetic data sets generated from a seed: the adding problem and periodic signals."""

from __future__ import annotations

import numpy as np

from dtrain.data.base import Arrays
from dtrain.errors import ConfigError


def adding(n_samples: int = 4000, seq_len: int = 50, seed: int = 0) -> Arrays:
    """The adding problem (Hochreiter & Schmidhuber 1997): sum the two marked values of a random sequence.

    Each sample is (seq_len, 2): channel 0 holds values drawn uniformly from [0, 1], channel 1 marks one position in
    the first half and one in the second half. The target is the sum of the two marked values, so always predicting
    its mean (1.0) scores a mean squared error of 1/6 ~ 0.167: the baseline a model that cannot remember stays at.
    """
    if seq_len < 2:
        raise ConfigError(f"data.options.seq_len: expected an integer >= 2, got {seq_len!r}")
    if n_samples < 1:
        raise ConfigError(f"data.options.n_samples: expected an integer >= 1, got {n_samples!r}")
    rng = np.random.default_rng(seed)
    values = rng.uniform(0.0, 1.0, size=(n_samples, seq_len))
    half = seq_len // 2
    first = rng.integers(0, half, size=n_samples)
    second = rng.integers(half, seq_len, size=n_samples)
    markers = np.zeros_like(values)
    rows = np.arange(n_samples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = np.stack([values, markers], axis=-1).astype(np.float32)
    y = (values[rows, first] + values[rows, second]).astype(np.float32)[:, None]
    return Arrays(x, y, "regression")


ADDING_BASELINE_MSE = 1.0 / 6.0
"""MSE of always predicting the mean on the adding problem (variance of a sum of two U(0, 1))."""


def periodic(n_samples: int = 600, seq_len: int = 64, num_classes: int = 3, noise: float = 1.0,
             seed: int = 0) -> Arrays:
    """Noisy sine waves with a random phase; the class is the frequency (class k has k + 2 cycles per window).

    The random phase makes the raw samples a poor input for a linear model, while the magnitude of the Fourier
    spectrum (data.fourier: true) is phase-invariant and separates the classes: the task that shows what the
    Fourier features add. Samples are (seq_len, 1) sequences.
    """
    if num_classes < 2:
        raise ConfigError(f"data.options.num_classes: expected an integer >= 2, got {num_classes!r}")
    if seq_len < 2 * (num_classes + 2):
        raise ConfigError(f"data.options.seq_len: expected at least {2 * (num_classes + 2)} samples for "
                          f"{num_classes} classes, got {seq_len!r}")
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=n_samples)
    t = np.arange(seq_len) / seq_len
    phase = rng.uniform(0, 2 * np.pi, size=(n_samples, 1))
    x = np.sin(2 * np.pi * (y[:, None] + 2) * t[None, :] + phase) + rng.normal(0, noise, size=(n_samples, seq_len))
    return Arrays(x[..., None].astype(np.float32), y.astype(np.int64), "classification", num_classes=num_classes)
