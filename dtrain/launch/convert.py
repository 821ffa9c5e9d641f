"""`dtrain data convert`: a data set dtrain loads in memory, written as Parquet files for data.name=parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dtrain.config import load_job, to_objects
from dtrain.data import load_arrays
from dtrain.data.parquet import write_shards
from dtrain.errors import DtrainError


def convert(src: str, dest: Path, overrides: list[str], rows_per_file: int) -> str:
    """The data set SRC (a registered name, or a job file's data section) as Parquet files under dest: all rows in
    a seeded random order (streaming shuffles within windows only), or train/ and test/ for a set with its own."""
    if Path(src).suffix in (".yaml", ".yml"):
        job = load_job(src, overrides)
    else:
        job = load_job(None, overrides, base={"model": {"name": "mlp"}, "data": {"name": src}})
    cfg = to_objects(job).data
    if cfg.name == "parquet":
        raise DtrainError("data.name: parquet is Parquet already; convert takes a data set dtrain loads in memory")
    if dest.exists() and any(dest.iterdir()):
        raise DtrainError(f"{dest}: not empty; choose a new folder")
    arrays = load_arrays(cfg)
    if arrays.y is not None and arrays.y.ndim > 1 and int(np.prod(arrays.y.shape[1:])) != 1:
        raise DtrainError(f"data.name: {cfg.name} has targets of shape {arrays.y.shape[1:]}; Parquet conversion "
                          "writes one target column")
    parts = arrays.split or {"": (arrays.x, arrays.y)}
    total = files = 0
    for name, (x, y) in parts.items():
        order = np.random.default_rng(cfg.seed).permutation(len(x)) if arrays.shuffle_split else np.arange(len(x))
        y = None if y is None else y.reshape(len(y))[order]
        files += write_shards(x[order], y, dest / name if name else dest, rows_per_file)
        total += len(x)
    d = int(np.prod(arrays.x.shape[1:]))
    return f"{total:,} rows ({d} feature columns f0..f{d - 1}{', label' if arrays.y is not None else ''}) in " \
           f"{files} Parquet file(s) to {dest}"
