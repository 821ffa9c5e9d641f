"""Data sets by name: each loader returns arrays; `load_data` splits, standardises and wraps them as tensors
(imported as dtrain.data's own names: see dtrain/data/__init__.py)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dtrain.data import bundled, files, generated, series, transforms
from dtrain.data.base import Arrays, DataBundle
from dtrain.data.config import STREAMED_ONLY, DataConfig
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
    if cfg.name in ("parquet", "images") or getattr(cfg, "stream", None):
        raise ConfigError(f"data.name: {cfg.name} streams through Ray Data in `dtrain train` (and parquet in `dtrain "
                          "tune`) only (not yet in dtrain preflight or in-process workers); `dtrain data convert` "
                          "reads the in-memory sets")
    _check_not_streamed_only(cfg)
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


def _check_not_streamed_only(cfg: Any) -> None:
    """A field only streaming reads, set for a data set that loads into memory, would be ignored without a word (a
    data.target naming the label column of an in-memory csv, whose loader takes data.options.target)."""
    defaults = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name in STREAMED_ONLY}
    for key, default in defaults.items():
        value = getattr(cfg, key, default)
        if value != default:
            own = [p for p in inspect.signature(data_loader(cfg.name)).parameters if p != "path"] \
                if cfg.name in DATASETS else []
            hint = f" (its options, in data.options: {', '.join(own)})" if own else ""
            raise ConfigError(f"data.{key}: read only by streamed data (parquet, images, csv or npz with data.stream: "
                              f"true), not by the in-memory {cfg.name}{hint}; got {value!r}")


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


def _split(arrays: Arrays, cfg: Any, into: np.ndarray | None = None
           ) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The train/val/test splits, each a view of one array [train | val | test]: the loaded one, rearranged in
    place, or `into` (an empty float32 array of x's shape), filled from it. A data set with its own train/test split
    (arrays.split) is split as it comes."""
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
    # Each split keeps its samples in their file order (the loader shuffles every epoch anyway), so the array is
    # rearranged in place into [train | val | test], each split a view of it: no second copy of the data set stays.
    parts = {"train": np.sort(order[:n_train]), "val": np.sort(order[n_train:n_train + n_val]),
             "test": np.sort(order[n_train + n_val:])}
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    if into is not None:
        x = into
        for k, (start, _) in bounds.items():
            _gather_rows(arrays.x, parts[k], x[start:])
    else:
        x = _writable_float32(arrays.x)
        held_out = {k: x[parts[k]] for k in ("val", "test")}  # copies, while the training rows move to the front
        _gather_rows(x, parts["train"], x)
        for k, rows in held_out.items():
            x[slice(*bounds[k])] = rows
        del held_out
    return {k: (x[slice(*b)], _maybe(arrays.y, parts[k])) for k, b in bounds.items()}


def _gather_rows(x: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out[:len(rows)] = x[rows], chunk by chunk (no full-size temporary). out may be x itself when rows ascend (so
    rows[i] >= i): the rows then move to the front of x in its own memory."""
    step = transforms.chunk_rows(x)
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        out[start:start + len(chunk)] = x[chunk]


def _maybe(y: np.ndarray | None, idx: Any) -> np.ndarray | None:
    return None if y is None else y[idx]


def fourier_features(x: np.ndarray) -> np.ndarray:
    """Append the FFT magnitude spectrum of each sample to its flattened features (sequences (N, L, C): along time,
    per channel)."""
    flat = x.reshape(len(x), -1)
    spec = np.abs(np.fft.rfft(x if x.ndim == 3 else flat, axis=1, norm="ortho")).reshape(len(x), -1)
    return np.concatenate([flat, spec], axis=-1)


def load_data(cfg: Any, shared: bool = False) -> DataBundle:
    """Load, split, transform (fourier, standardise with training statistics) and tensorise data set cfg.name.

    shared: the features of the three splits are views of one tensor in shared memory (filled from the loaded
    array, which is then dropped), which torch.multiprocessing hands to other processes without a copy: the local
    launcher's ranks all read the driver's one copy. (Where the data set comes with its own split, or with
    data.fourier, the splits are separate arrays and handing them over copies each into shared memory.)"""
    arrays = load_arrays(cfg)
    if len(arrays.x) == 0:
        raise DataError(f"data.name={cfg.name}: the data set is empty")
    base = None
    if shared and arrays.split is None and not cfg.fourier:  # fourier makes new arrays: nothing to fill
        base = torch.empty(arrays.x.shape, dtype=torch.float32).share_memory_()
    splits = _split(arrays, cfg, into=None if base is None else base.numpy())
    if len(splits["train"][0]) == 0:
        raise DataError(f"data: no training samples left after the val/test split of {len(arrays.x)} samples")
    if base is not None:
        arrays.x = None  # copied into base: the loaded array goes now
    if cfg.fourier:
        splits = {k: (fourier_features(x), y) for k, (x, y) in splits.items()}
    splits = {k: (_writable_float32(x), y) for k, (x, y) in splits.items()}
    if cfg.standardize and arrays.task != "unsupervised_binary":
        mean, std = transforms.mean_std(splits["train"][0])
        std[std < 1e-8] = 1.0
        for x, _ in splits.values():
            transforms.scale_(x, mean, std)
    if cfg.minmax:  # to [0, 1] with the training min/max; val/test values outside that range are clipped
        low, high = transforms.min_max(splits["train"][0])
        span = high - low
        span[span < 1e-8] = 1.0
        for x, _ in splits.values():
            transforms.scale_(x, low, span, clip=(0.0, 1.0))
    tensors = {k: _tensors(x, y, arrays.task) for k, (x, y) in splits.items()}
    if base is not None:  # the same memory, as views of base (one storage to hand over)
        parts = base.split([len(t[0]) for t in tensors.values()])
        tensors = {k: (part, *t[1:]) for (k, t), part in zip(tensors.items(), parts, strict=True)}
    sample = tensors["train"][0]
    output_dim = 0
    if arrays.task == "regression" and arrays.y is not None:
        output_dim = int(np.prod(tensors["train"][1].shape[1:])) or 1
    meta = DataMeta(input_shape=tuple(sample.shape[1:]), num_classes=arrays.num_classes, output_dim=output_dim,
                    task="unsupervised" if arrays.task.startswith("unsupervised") else arrays.task,
                    period=arrays.period)
    return DataBundle(tensors["train"], tensors["val"], tensors["test"], meta)


def _writable_float32(x: np.ndarray) -> np.ndarray:
    """x as a contiguous float32 array this pipeline may scale in place (copied only when it is not one already)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x if x.flags.writeable else x.copy()


def _tensors(x: np.ndarray, y: np.ndarray | None, task: str) -> tuple[Tensor, ...]:
    """Tensors sharing the arrays' memory (no copy when they are contiguous and of the right dtype already)."""
    xt = torch.from_numpy(_writable_float32(x))
    if y is None:
        return (xt,)
    dtype = np.int64 if task == "classification" else np.float32
    return (xt, torch.from_numpy(np.ascontiguousarray(y, dtype=dtype)))
