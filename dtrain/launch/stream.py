"""Files streamed through Ray Data to Ray Train's workers (data.name parquet, images, csv and npz with
data.stream=true; docs/streaming.md).

On the driver, `prepare` builds one Ray Data pipeline per split from the files' metadata (dtrain.data.stream_source),
counts the rows of each split and takes the standardisation statistics in one Ray Data pass (only per-block
partial moments reach the driver); TorchTrainer(datasets=..., dataset_config=data_config()) splits each pipeline
into equal shares, one per worker. In a worker, `worker_stream` hands each share's epochs to dtrain.data.streaming.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from typing import Any

import numpy as np

from dtrain.data.stream_batches import (
    SPLITS,
    check_classes,
    combine_moments,
    image_rows,
    keep_split,
    npz_rows,
    split_moments,
    target_range,
    to_xy,
)
from dtrain.data.stream_source import SourceFiles, StreamSource
from dtrain.data.streaming import StreamData
from dtrain.errors import ConfigError, DataError, DtrainError, find_in_chain, first_line

STREAM_BATCH_ROWS = 4096
"""Rows per batch a worker takes from its share (re-cut into micro-batches by the loader)."""
PREFETCH_BATCHES = 2
"""Batches a worker's share reads ahead while the model trains."""
MIN_BLOCK_BYTES = 32 * 2**20
"""Ray Data's target_min_block_size for the streams (Ray's default is 1 MiB): a read is cut into at most 200 blocks,
but none smaller than this. Each block is a task and a round of Ray Data's scheduling, which take CPU from training
where the workers hold every core; larger sets are cut into 200 blocks (or blocks of at most 128 MiB) as before."""


def set_data_context() -> None:
    """No progress bars or per-execution notices from Ray Data on the console (dtrain prints its own progress), Ray
    Data's first Parquet reader (V1): the V2 reader starts a pool of footer-reading actors (new processes) at every
    execution, which is every epoch of every split here; and blocks of at least MIN_BLOCK_BYTES."""
    from ray.data import DataContext

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # (it warns that the bars are off)
    # a capped concurrency (task_resources) above a small data set's number of read tasks is no mistake
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks", category=UserWarning)
    ctx = DataContext.get_current()
    ctx.use_datasource_v2 = False
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.raise_original_map_exception = True  # a per-batch transform's DataError reaches the driver, not Ray's wrapper
    ctx.execution_options.preserve_order = True  # the epoch's order is deterministic (see data_config)
    ctx.target_min_block_size = MIN_BLOCK_BYTES


def _read(source: StreamSource, files: SourceFiles, columns: list[str], tasks: dict[str, Any]) -> Any:
    """The files' rows of the used columns, as Ray Data reads them (the file list is the driver's)."""
    import ray.data

    common = {"filesystem": files.filesystem, "partitioning": None, "file_extensions": None, **tasks}
    if source.fmt == "images":  # decoded by PIL in Ray Data's tasks; the class is the folder under files.root
        read = source.read
        images = ray.data.read_images(files.paths, size=read["size"], mode=read["mode"], include_paths=True,
                                      **common)
        return images.map_batches(image_rows, fn_kwargs={"classes": read["classes"], "root": files.root,
                                                         "shape": read["shape"]}, batch_format="numpy", **tasks)
    if source.fmt == "npz":  # each file whole (np.load needs to seek), its arrays as columns
        return ray.data.read_binary_files(files.paths, **common).map_batches(
            npz_rows, fn_kwargs={"columns": columns}, batch_size=1, batch_format="numpy", **tasks)
    if source.fmt == "csv":
        from pyarrow import csv

        options = csv.ConvertOptions(column_types=source.read["column_types"], include_columns=columns)
        return ray.data.read_csv(files.paths, convert_options=options, **common)
    return ray.data.read_parquet(files.paths, **common).select_columns(columns)


def task_resources(spare_cpus: float, cluster_cpus: float) -> dict[str, Any]:
    """What each Ray Data task asks for (Ray's num_cpus and concurrency): 1 CPU, or the share of one that the
    training workers leave free. When they hold every CPU (a small machine), the tasks ask for none and share the
    workers' CPUs instead of waiting for ever, and at most one task per CPU of the cluster runs at once: tasks that
    ask for no CPU are otherwise started without limit, each in a new worker process."""
    if spare_cpus > 0:
        return {"num_cpus": min(1.0, spare_cpus)}
    return {"num_cpus": 0, "concurrency": max(1, int(cluster_cpus))}


def prepare(source: StreamSource, standardize: bool, tasks: dict[str, Any] | None = None
            ) -> tuple[dict[str, Any], StreamData]:
    """(the Ray datasets of the splits that have rows, what the workers need to know of them); tasks: the Ray
    resources of each Ray Data task (task_resources; default 1 CPU). One Ray Data pass over data.path counts the
    rows of each split and takes the training statistics (each block reduced to a row of partial moments, merged
    here), and a CSV target's classes; own val/test files are counted from their metadata, or by Ray Data where it
    has none (CSV)."""
    set_data_context()
    tasks = tasks or {"num_cpus": 1.0}
    used = [*source.features, *([source.target] if source.target else [])]
    hashed = {"columns": used, "seed": source.seed, "val_fraction": source.val_fraction,
              "test_fraction": source.test_fraction}
    train_files = _read(source, source.files["train"], used, tasks)  # one read plan (its file listing) for all its uses
    raw = {}
    for index, name in enumerate(SPLITS):
        own = source.files[name]
        ds = train_files if name == "train" or own is None else _read(source, own, used, tasks)
        if own is None or (name == "train" and (source.val_fraction or source.test_fraction)):
            ds = ds.map_batches(keep_split, fn_kwargs={"split": index, **hashed}, batch_format="numpy",
                                **tasks)
        raw[name] = ds
    where = source.files["train"].location
    moments = train_files.map_batches(
        split_moments, fn_kwargs={"features": source.features if standardize else [], "target": source.target,
                                  **hashed}, batch_format="numpy", **tasks)
    parts = _guarded(lambda: list(moments.iter_rows()), where)
    split_counts, mean, std = combine_moments(parts)
    counts = {name: int(split_counts[i]) for i, name in enumerate(SPLITS)} | dict(source.counts)
    for name in ("val", "test"):  # own files without row counts in their metadata
        if source.files[name] is not None and name not in source.counts:
            counts[name] = _guarded(raw[name].count, source.files[name].location)
    meta = source.meta
    if source.count_classes:
        meta = dataclasses.replace(meta, num_classes=check_classes(*target_range(parts), where))
    if counts["train"] == 0:
        raise DataError(f"data.path: no training rows left after the val/test split of {where}")
    if standardize:
        mean, std = mean.astype(np.float32), std.astype(np.float32)
        std[~(std >= 1e-8)] = 1.0
    else:
        mean = std = None
    xy = functools.partial(to_xy, features=source.features, target=source.target, task=meta.task,
                           mean=mean, std=std, shape=meta.input_shape)
    datasets = {name: ds.map_batches(xy, batch_format="numpy", **tasks) for name, ds in raw.items()
                if counts[name]}
    return datasets, StreamData(meta, counts)


def _guarded(fn: Any, where: str) -> Any:
    """fn(), with a failure to read the files as one DataError line (a file corrupt past its footer, a store that
    went away, a per-batch transform's DataError: an image of another size)."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - Ray wraps the reader's error in its own
        if type(err) in (DataError, ConfigError, DtrainError):  # raised here, not in a Ray Data task
            raise
        ours = find_in_chain(err, lambda e: type(e) in (DataError, ConfigError))
        raise DataError(f"data.path: reading {where} failed: {first_line(ours or _root(err))[:200]}") from None


def _root(err: BaseException) -> BaseException:
    while getattr(err, "cause", None) is not None or err.__cause__ is not None:
        err = getattr(err, "cause", None) or err.__cause__
    return err


def data_config() -> Any:
    """Ray Train's split of the datasets: equal shares, in Ray Data's deterministic order (preserve_order, which
    also makes the split ignore locality: the same rows go to the same rank in every epoch and every run)."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig

    return DataConfig(execution_options=ExecutionOptions(preserve_order=True), enable_shard_locality=False)


def worker_stream(info: StreamData, shuffle_buffer: int) -> StreamData:
    """In a Ray Train worker: info with each split's epochs over this worker's share."""
    import ray.train

    epochs = {}
    for name in SPLITS:
        if info.counts.get(name):
            epochs[name] = functools.partial(_epoch, ray.train.get_dataset_shard(name))
    return StreamData(info.meta, info.counts, shuffle_buffer, epochs)


def _epoch(shard: Any) -> Any:
    return shard.iter_batches(batch_size=STREAM_BATCH_ROWS, batch_format="numpy", prefetch_batches=PREFETCH_BATCHES)
