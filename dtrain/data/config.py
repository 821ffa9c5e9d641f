"""The data section of a job (DataConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dtrain.errors import check

STREAMED_ONLY = ("val_path", "test_path", "target", "features", "shuffle_buffer")
"""The fields only a streamed data set reads (an in-memory one takes its own split, and columns as data.options)."""


@dataclass
class DataConfig:
    name: str = "digits"
    """Data set name from the registry (`dtrain models` lists them), e.g. digits, adding, npz; or the import path
    module:function of a loader returning dtrain.data.Arrays (its keyword arguments are data.options)."""
    path: str | None = None
    """File for file-backed data sets (npz, csv, idx); for a streamed data set (parquet, csv with stream=true) a
    file, folder, glob or URI (s3://, gs://, any URI pyarrow.fs opens), for images a folder or URI with one
    subfolder of images per class; read by Ray Data (docs/streaming.md)."""
    stream: bool | None = None
    """Stream the data through Ray Data instead of loading it into memory: null = parquet and images stream, every
    other data set loads into memory; true streams csv (data.path: CSV files with a header row) and npz (.npz files
    whose arrays are the columns, e.g. x and y) too; false is not possible for parquet and images."""
    val_path: str | None = None
    """streamed: the validation split's own files (else a seeded share val_fraction of data.path's rows)."""
    test_path: str | None = None
    """streamed: the test split's own files (else a seeded share test_fraction of data.path's rows)."""
    target: str | None = "label"
    """streamed: the target column (npz: y when the files have no label array); null for unsupervised models."""
    features: list[str] | None = None
    """streamed: the feature columns; null = every column but the target. A column may hold a tensor per row (an
    .npz array of shape (rows, ...)): a single such column keeps its shape as the model's input."""
    shuffle_buffer: int = 10_000
    """streamed: rows each worker shuffles together (seeded per epoch) as they stream in."""
    batch_size: int = 64
    """Mini-batch size per worker; global batch = batch_size x workers x grad_accum. With global_batch_size set:
    the most samples one worker feeds forward at once (its micro-batch)."""
    global_batch_size: int | None = None
    """Samples per optimizer step over all workers, kept whatever their number (elastic runs, --resume at another
    trainer.num_workers): each worker takes global_batch_size / workers of every step, accumulated over as many
    micro-batches of at most batch_size as that needs (at least trainer.grad_accum); null = batch_size x workers
    x grad_accum. See docs/elastic.md."""
    val_fraction: float = 0.1
    """Share of the non-test data held out for validation (ignored when the data set has its own split)."""
    test_fraction: float = 0.2
    """Share of the data held out for testing (ignored when the data set has its own split)."""
    seed: int = 0
    """Seed of the train/val/test split."""
    standardize: bool = True
    """Scale features to zero mean and unit variance using training statistics only."""
    minmax: bool = False
    """Rescale each feature to [0, 1] with the training split's min and max (clipped), e.g. for Bernoulli RBMs;
    needs standardize=false."""
    fourier: bool = False
    """Append the FFT magnitude spectrum of each sequence/signal to its features."""
    options: dict[str, Any] = field(default_factory=dict)
    """Data-set specific keyword arguments, e.g. {seq_len: 50} for adding."""

    def __post_init__(self) -> None:
        check(self.stream is not False or self.name not in ("parquet", "images"), "data.stream",
              f"true or null for data.name={self.name} (it only streams)", self.stream)
        check(not self.stream or self.name in ("parquet", "images", "csv", "npz"), "data.stream",
              f"false or null for data.name={self.name} (only parquet, images, csv and npz stream)", self.stream)
        check(self.shuffle_buffer >= 1, "data.shuffle_buffer", "an integer >= 1", self.shuffle_buffer)
        check(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        check(self.global_batch_size is None or self.global_batch_size >= 1, "data.global_batch_size",
              "an integer >= 1 or null", self.global_batch_size)
        check(0 <= self.val_fraction < 1, "data.val_fraction", "a number in [0, 1)", self.val_fraction)
        check(0 <= self.test_fraction < 1, "data.test_fraction", "a number in [0, 1)", self.test_fraction)
        check(self.seed >= 0, "data.seed", "an integer >= 0", self.seed)
        check(not (self.minmax and self.standardize), "data.minmax", "standardize=false alongside minmax=true",
              "standardize=true")
