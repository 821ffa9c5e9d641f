"""Feature scaling with training statistics, in place and in row chunks: a data set never needs a float64 copy of
itself, or any full-size temporary, to be standardised or rescaled."""

from __future__ import annotations

import numpy as np

CHUNK_BYTES = 2**22
"""Rows are processed in chunks of about this many bytes (float64 temporaries included): a few MiB at most."""


def _rows(x: np.ndarray) -> np.ndarray:
    """x as rows of features: (N, F) as it is, sequences (N, L, C) as (N * L, C) (statistics per channel)."""
    return x.reshape(-1, x.shape[-1]) if x.ndim == 3 else x.reshape(len(x), -1)


def chunk_rows(x: np.ndarray) -> int:
    """Rows of x per chunk: about CHUNK_BYTES of float64."""
    return max(1, CHUNK_BYTES // (8 * max(1, int(np.prod(x.shape[1:])))))


def _chunks(x: np.ndarray):
    rows = _rows(x)
    step = chunk_rows(rows)
    for start in range(0, len(rows), step):
        yield rows[start:start + step]


def mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and standard deviation, accumulated in float64 chunk by chunk (two passes)."""
    n = len(_rows(x))
    mean = sum(chunk.sum(axis=0, dtype=np.float64) for chunk in _chunks(x)) / n
    var = sum(np.square(chunk - mean).sum(axis=0) for chunk in _chunks(x)) / n
    return mean, np.sqrt(var)


def min_max(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    chunks = list(_chunks(x))
    return np.min([c.min(axis=0) for c in chunks], axis=0), np.max([c.max(axis=0) for c in chunks], axis=0)


def scale_(x: np.ndarray, shift: np.ndarray, scale: np.ndarray, clip: tuple[float, float] | None = None) -> np.ndarray:
    """(x - shift) / scale (then clipped), in place on float32 x, chunk by chunk; returns x."""
    shift32, scale32 = shift.astype(x.dtype), scale.astype(x.dtype)
    for chunk in _chunks(x):
        chunk -= shift32
        chunk /= scale32
        if clip is not None:
            np.clip(chunk, *clip, out=chunk)
    return x


def all_finite(x: np.ndarray) -> bool:
    """Whether every value is finite, without a full-size boolean temporary."""
    return all(np.isfinite(chunk).all() for chunk in _chunks(x)) if x.size else True
