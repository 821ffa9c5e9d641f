"""Data sets by name: each loader returns arrays; `load_data` splits, standardises and wraps them as tensors."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dtrain.data import bundled, files, generated, series
from dtrain.data.base import Arrays, DataBundle
from dtrain.errors import ConfigError, DataError, DtrainError, first_line
from dtrain.models.base import DataMeta
from dtrain.models.plugins import check_keywords, function_by_name

# name -> loader(**options) -> Arrays
DATASETS: dict[str, Callable[..., Arrays]] = {
    "digits": bundled.digits,
    "breast_cancer": bundled.breast_cancer,
    "iris": bundled.iris,
    "wine": bundled.wine,
    "xor": bundled.xor,
    "adding": generated.adding,
    "periodic": generated.periodic,
    "sunspots": series.sunspots,
    "mnist": files.mnist,
    "npz": files.npz,
    "csv": files.csv,
}


def data_loader(name: str) -> Callable[..., Arrays]:
    """The loader called name: a registered data set, or the function at a `module:function` import path."""
    return function_by_name(name, DATASETS, "data.name", "a function returning dtrain.data.Arrays")


def load_arrays(cfg: Any) -> Arrays:
    """Call the data set's loader with cfg.options (and cfg.path for file-backed sets), checking the arguments."""
    loader = data_loader(cfg.name)
    if cfg.name not in DATASETS:
        return _user_arrays(loader, cfg)
    params = inspect.signature(loader).parameters
    kwargs = dict(cfg.options or {})
    if "path" in params:
        if not cfg.path:
            raise ConfigError(f"data.path: required for data set {cfg.name!r}")
        kwargs["path"] = cfg.path
    elif cfg.path:
        raise ConfigError(f"data.path: data set {cfg.name!r} takes no file")
    for key in kwargs:
        if key not in params:
            allowed = ", ".join(p for p in params if p != "path") or "none"
            raise ConfigError(f"data.options.{key}: unknown option for {cfg.name!r} (allowed: {allowed})")
    return loader(**kwargs)


def _user_arrays(loader: Callable[..., Any], cfg: Any) -> Arrays:
    """The user's loader, called like a registered one; its mistakes are one line naming data.name."""
    kwargs = dict(cfg.options or {}, **({"path": cfg.path} if cfg.path else {}))
    check_keywords(loader, kwargs, lambda key: "data.path" if key == "path" else f"data.options.{key}", cfg.name)
    try:
        arrays = loader(**kwargs)
    except DtrainError:
        raise
    except Exception as err:
        raise DataError(f"data.name: {cfg.name} failed: {type(err).__name__}: {first_line(err)}") from None
    if not isinstance(arrays, Arrays):
        raise DataError(f"data.name: {cfg.name} returned {type(arrays).__name__}, expected dtrain.data.Arrays")
    tasks = ("classification", "regression", "unsupervised", "unsupervised_binary")
    if arrays.task not in tasks:
        raise DataError(f"data.name: {cfg.name} returned task {arrays.task!r}, expected one of {', '.join(tasks)}")
    if arrays.y is not None and len(arrays.y) != len(arrays.x):
        raise DataError(f"data.name: {cfg.name} returned {len(arrays.x)} samples but {len(arrays.y)} targets")
    return arrays


def _split(arrays: Arrays, cfg: Any) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    if arrays.split is not None:
        train_x, train_y = arrays.split["train"]
        n_val = int(round(len(train_x) * cfg.val_fraction))
        return {"train": (train_x[n_val:], _maybe(train_y, slice(n_val, None))),
                "val": (train_x[:n_val], _maybe(train_y, slice(None, n_val))),
                "test": arrays.split["test"]}
    n = len(arrays.x)
    order = np.random.default_rng(cfg.seed).permutation(n) if arrays.shuffle_split else np.arange(n)
    n_test = int(round(n * cfg.test_fraction))
    n_val = int(round((n - n_test) * cfg.val_fraction))
    n_train = n - n_test - n_val
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {k: (arrays.x[idx], _maybe(arrays.y, idx)) for k, idx in parts.items()}


def _maybe(y: np.ndarray | None, idx: Any) -> np.ndarray | None:
    return None if y is None else y[idx]


def fourier_features(x: np.ndarray) -> np.ndarray:
    """Append the FFT magnitude spectrum of each sample to its flattened features (sequences (N, L, C): along time,
    per channel)."""
    flat = x.reshape(len(x), -1)
    spec = np.abs(np.fft.rfft(x if x.ndim == 3 else flat, axis=1, norm="ortho")).reshape(len(x), -1)
    return np.concatenate([flat, spec], axis=-1)


def load_data(cfg: Any) -> DataBundle:
    """Load, split, transform (fourier, standardise with training statistics) and tensorise data set cfg.name."""
    arrays = load_arrays(cfg)
    if len(arrays.x) == 0:
        raise DataError(f"data.name={cfg.name}: the data set is empty")
    splits = _split(arrays, cfg)
    if len(splits["train"][0]) == 0:
        raise DataError(f"data: no training samples left after the val/test split of {len(arrays.x)} samples")
    if cfg.fourier:
        splits = {k: (fourier_features(x), y) for k, (x, y) in splits.items()}
    if cfg.standardize and arrays.task != "unsupervised_binary":
        train_x = splits["train"][0].astype(np.float64)
        axes = tuple(range(train_x.ndim - 1)) if train_x.ndim == 3 else 0
        mean, std = train_x.mean(axis=axes), train_x.std(axis=axes)
        std[std < 1e-8] = 1.0
        splits = {k: ((x - mean) / std, y) for k, (x, y) in splits.items()}
    if cfg.minmax:
        splits = _minmax(splits)
    tensors = {k: _tensors(x, y, arrays.task) for k, (x, y) in splits.items()}
    sample = tensors["train"][0]
    output_dim = 0
    if arrays.task == "regression" and arrays.y is not None:
        output_dim = int(np.prod(tensors["train"][1].shape[1:])) or 1
    meta = DataMeta(input_shape=tuple(sample.shape[1:]), num_classes=arrays.num_classes, output_dim=output_dim,
                    task="unsupervised" if arrays.task.startswith("unsupervised") else arrays.task,
                    period=arrays.period)
    return DataBundle(tensors["train"], tensors["val"], tensors["test"], meta)


def _minmax(splits: dict[str, tuple[np.ndarray, np.ndarray | None]]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Scale to [0, 1] with the training min/max; val/test values outside the training range are clipped."""
    train_x = splits["train"][0].astype(np.float64)
    axes = tuple(range(train_x.ndim - 1)) if train_x.ndim == 3 else 0
    low, span = train_x.min(axis=axes), train_x.max(axis=axes) - train_x.min(axis=axes)
    span[span < 1e-8] = 1.0
    return {k: (np.clip((x - low) / span, 0.0, 1.0), y) for k, (x, y) in splits.items()}


def _tensors(x: np.ndarray, y: np.ndarray | None, task: str) -> tuple[Tensor, ...]:
    xt = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)
    if y is None:
        return (xt,)
    yt = torch.as_tensor(np.ascontiguousarray(y), dtype=torch.long if task == "classification" else torch.float32)
    return (xt, yt)
