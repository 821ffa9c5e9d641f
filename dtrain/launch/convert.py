"""`dtrain data convert`: a data set dtrain loads in memory, written as Parquet files for data.name=parquet, as .npz
files for data.name=npz data.stream=true, or as PNG images in class folders for data.name=images."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dtrain.config import load_job, to_objects
from dtrain.data import load_arrays
from dtrain.data.stream_source import write_shards
from dtrain.errors import DtrainError
from dtrain.launch.train import usable_folder


def convert(src: str, dest: Path, overrides: list[str], rows_per_file: int, fmt: str = "parquet") -> str:
    """The data set SRC (a registered name, or a job file's data section) as Parquet files (or .npz files, or PNG
    images) under dest: all rows in a seeded random order (streaming shuffles within windows only), or train/ and
    test/ for a set with its own."""
    if Path(src).suffix in (".yaml", ".yml"):
        job = load_job(src, overrides)
    else:
        job = load_job(None, overrides, base={"model": {"name": "mlp"}, "data": {"name": src}})
    cfg = to_objects(job).data
    if cfg.name in ("parquet", "images") or cfg.stream:
        raise DtrainError(f"data.name: {cfg.name} is streamed from its files already; convert takes a data set "
                          "dtrain loads in memory")
    if dest.is_dir() and any(dest.iterdir()):
        raise DtrainError(f"{dest}: not empty; choose a new folder")
    existed = dest.exists()
    usable_folder(dest, "DEST")  # before the data loads
    try:
        return _write(cfg, dest, rows_per_file, fmt)
    except BaseException:  # nothing half-written stays: dest was empty, or not there
        for child in dest.iterdir() if existed else [dest]:
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        raise


def _write(cfg: Any, dest: Path, rows_per_file: int, fmt: str) -> str:
    arrays = load_arrays(cfg)
    if arrays.y is not None and arrays.y.ndim > 1 and int(np.prod(arrays.y.shape[1:])) != 1:
        raise DtrainError(f"data.name: {cfg.name} has targets of shape {arrays.y.shape[1:]}; Parquet conversion "
                          "writes one target column")
    parts = arrays.split or {"": (arrays.x, arrays.y)}
    if fmt == "images":
        return _to_images(cfg.name, parts, dest, cfg.seed, arrays.shuffle_split)
    total = files = 0
    for name, (x, y) in parts.items():
        order = np.random.default_rng(cfg.seed).permutation(len(x)) if arrays.shuffle_split else np.arange(len(x))
        y = None if y is None else y.reshape(len(y))[order]
        files += write_shards(x[order], y, dest / name if name else dest, rows_per_file, fmt)
        total += len(x)
    if fmt == "npz":
        return f"{total:,} rows (arrays x {tuple(arrays.x.shape[1:])}{', y' if arrays.y is not None else ''}) in " \
               f"{files} .npz file(s) to {dest}"
    d = int(np.prod(arrays.x.shape[1:]))
    return f"{total:,} rows ({d} feature columns f0..f{d - 1}{', label' if arrays.y is not None else ''}) in " \
           f"{files} Parquet file(s) to {dest}"


def _image_shape(name: str, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, H, W) of one sample: (C, H, W) with 1 or 3 channels, (H, W), or a square number of features (gray)."""
    side = int(round(np.sqrt(shape[0]))) if len(shape) == 1 else 0
    if len(shape) == 3 and shape[0] in (1, 3):
        return shape
    if len(shape) == 2:
        return (1, *shape)
    if side * side == shape[0]:
        return (1, side, side)
    raise DtrainError(f"data.name: {name} has samples of shape {shape}, not images: expected (C, H, W) with 1 or 3 "
                      "channels, (H, W) or a square number of features")


def _to_images(name: str, parts: dict[str, tuple[np.ndarray, np.ndarray | None]], dest: Path, seed: int,
               shuffle: bool) -> str:
    """PNG files dest/[split/]<class>/<index>.png (class folders zero-padded so they sort as the class ids); the
    values scaled from the data set's [min, max] to 0..255."""
    from PIL import Image

    first_x, _ = next(iter(parts.values()))
    c, h, w = _image_shape(name, first_x.shape[1:])
    low = min(float(x.min()) for x, _ in parts.values())
    high = max(float(x.max()) for x, _ in parts.values())
    total = 0
    for split, (x, y) in parts.items():
        if y is None or not np.issubdtype(y.dtype, np.integer):
            raise DtrainError(f"data.name: {name} has no class labels; image folders need one class per folder")
        y = y.reshape(len(y))
        width = len(str(int(y.max())))
        order = np.random.default_rng(seed).permutation(len(x)) if shuffle else np.arange(len(x))
        pixels = np.rint((x.reshape(len(x), c, h, w) - low) / max(high - low, 1e-12) * 255).astype(np.uint8)
        for i, row in enumerate(order):
            folder = dest / split / f"{int(y[row]):0{width}d}"
            folder.mkdir(parents=True, exist_ok=True)
            image = pixels[row, 0] if c == 1 else pixels[row].transpose(1, 2, 0)
            Image.fromarray(image).save(folder / f"{i:06d}.png")
        total += len(x)
    return f"{total:,} {h}x{w} {'gray' if c == 1 else 'RGB'} PNG images in class folders to {dest}"
