"""Time series as windowed forecasting data sets: the yearly sunspot numbers (statsmodels), and baselines."""

from __future__ import annotations

import numpy as np

from dtrain.data.base import Arrays
from dtrain.errors import ConfigError


def windows(series: np.ndarray, window: int, horizon: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Sliding windows over a 1-d series: x (N, window, 1) of past values, y (N, 1) the value `horizon` steps on."""
    series = np.asarray(series, dtype=np.float32)
    n = len(series) - window - horizon + 1
    if n < 1:
        raise ConfigError(f"data.options.window: {window} (+ horizon {horizon}) leaves no samples in a series "
                          f"of length {len(series)}")
    idx = np.arange(window)[None, :] + np.arange(n)[:, None]
    x = series[idx][..., None]
    y = series[window + horizon - 1:window + horizon - 1 + n][:, None]
    return x, y


def sunspots(window: int = 12, horizon: int = 1, scale: float = 100.0) -> Arrays:
    """Yearly sunspot numbers 1700-2008 (statsmodels): forecast the value `horizon` years after a `window`.

    Values are divided by the fixed constant `scale` (not a statistic of the data, so nothing leaks from the test
    years) to keep targets near 1. The split keeps time order: the test set is the most recent years.
    """
    if window < 1 or horizon < 1:
        raise ConfigError(f"data.options: window and horizon must be >= 1, got {window} and {horizon}")
    if scale <= 0:
        raise ConfigError(f"data.options.scale: expected a number > 0, got {scale!r}")
    from statsmodels.datasets import sunspots as sm_sunspots

    series = sm_sunspots.load_pandas().data["SUNACTIVITY"].to_numpy() / scale
    x, y = windows(series, window, horizon)
    return Arrays(x, y, "regression", period=11, shuffle_split=False)


def persistence_mse(x: np.ndarray, y: np.ndarray) -> float:
    """MSE of the persistence forecast (the next value equals the last one seen) on windows x (N, L, 1), targets y.

    x must be on the same scale as y (i.e. not standardised) for the comparison to mean anything.
    """
    last = np.asarray(x)[:, -1, 0].reshape(-1)
    return float(np.mean((last - np.asarray(y).reshape(-1)) ** 2))
