"""Parquet files as a data set that is never loaded whole (`data.name: parquet`): what the driver learns from the
files' metadata alone (schema, rows per file, the target's range), the per-batch transforms the streaming pipeline
applies (the seeded split, features and target as arrays, standardisation), and the writer behind
`dtrain data convert`. pyarrow only: the launcher builds the Ray Data pipeline from a ParquetSource.
"""

from __future__ import annotations

import glob
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtrain.errors import ConfigError, DataError, first_line

if TYPE_CHECKING:  # the per-batch transforms below run in Ray Data's workers, which need not import torch
    from dtrain.models.base import DataMeta

SPLITS = ("train", "val", "test")


@dataclass
class ParquetFiles:
    """One split's files: where they are (a pyarrow filesystem and paths in it) and what they hold."""

    location: str
    """As the user wrote it (data.path, data.val_path, data.test_path)."""
    filesystem: Any
    paths: list[str]
    rows: list[int]
    schema: Any

    @property
    def num_rows(self) -> int:
        return sum(self.rows)


@dataclass
class ParquetSource:
    """What the driver knows of a Parquet data set before anything is read: its files per split (val/test None
    when they come from the seeded split of data.path), the columns used, the task."""

    files: dict[str, ParquetFiles | None]
    features: list[str]
    target: str | None
    meta: DataMeta
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    """Rows per split, when the metadata tells (own files); the seeded split's are counted by the launcher."""


def open_location(location: str, key: str) -> tuple[Any, list[str]]:
    """(filesystem, the .parquet files) of a local file, folder or glob, or a URI (s3://, gs://, ...)."""
    from pyarrow import fs as pafs

    from dtrain.storage import is_uri, open_uri

    if is_uri(location):
        filesystem, path = open_uri(location, key)
        try:
            info = filesystem.get_file_info(path)
            if info.type == pafs.FileType.File:
                return filesystem, [path]
            found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError as err:
            from dtrain.storage import _reason

            raise DataError(f"{key}: cannot read {location}: {_reason(err)}") from None
        if info.type == pafs.FileType.NotFound and not found:
            raise DataError(f"{key}: {location} not found")
        return filesystem, sorted(i.path for i in found if i.type == pafs.FileType.File and _is_parquet(i.path))
    local = Path(location).expanduser()
    if any(c in location for c in "*?["):
        matches = sorted(glob.glob(str(local), recursive=True))
        if not matches:
            raise DataError(f"{key}: {location} matches no file")
        files = [m for m in matches if Path(m).is_file()]
    elif local.is_file():
        files = [str(local)]
    elif local.is_dir():
        files = sorted(str(p) for p in local.rglob("*") if p.is_file() and _is_parquet(str(p)))
    else:
        raise DataError(f"{key}: {location} not found")
    return pafs.LocalFileSystem(), [str(Path(f).resolve()) for f in files]


def _is_parquet(path: str) -> bool:
    name = posixpath.basename(path)
    return name.endswith((".parquet", ".parq")) and not name.startswith((".", "_"))


def scan(location: str, key: str) -> ParquetFiles:
    """The files at location, each one's schema and row count read from its footer; every file must have the same
    schema. DataError naming the file for a missing, empty, corrupt or mismatched one."""
    import pyarrow.parquet as pq

    filesystem, paths = open_location(location, key)
    if not paths:
        raise DataError(f"{key}: {location} holds no .parquet file")
    rows, schema, first = [], None, None
    for path in paths:
        try:
            with filesystem.open_input_file(path) as f:
                meta = pq.ParquetFile(f).metadata
                file_schema = meta.schema.to_arrow_schema()
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for a corrupt footer
            raise DataError(f"{key}: {path}: not a readable Parquet file ({first_line(err)[:120]})") from None
        if schema is None:
            schema, first = file_schema, path
        elif not file_schema.equals(schema):
            raise DataError(f"{key}: {path}: its columns ({_columns(file_schema)}) differ from {first}'s "
                            f"({_columns(schema)})")
        rows.append(meta.num_rows)
    return ParquetFiles(location, filesystem, paths, rows, schema)


def _columns(schema: Any) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def columns_of(files: ParquetFiles, features: list[str] | None, target: str | None) -> tuple[list[str], str | None]:
    """The feature and target columns (features default to every column but the target); each one numeric."""
    import pyarrow.types as pat

    names = files.schema.names
    listed = ", ".join(names[:8]) + (f", ... ({len(names)} columns)" if len(names) > 8 else "")
    if target is not None and target not in names:
        raise ConfigError(f"data.target: no column {target!r} in {files.location} (columns: {listed})")
    features = list(features) if features else [n for n in names if n != target]
    for name in features:
        if name not in names:
            raise ConfigError(f"data.features: no column {name!r} in {files.location} (columns: {listed})")
    if not features:
        raise ConfigError(f"data.features: {files.location} has no column besides the target {target!r}")
    for name in [*features, *([target] if target else [])]:
        kind = files.schema.field(name).type
        if not (pat.is_integer(kind) or pat.is_floating(kind) or pat.is_boolean(kind)):
            raise DataError(f"data.features: column {name!r} of {files.location} is {kind}, expected a number")
    return features, target


def check_same_columns(files: ParquetFiles, reference: ParquetFiles, used: list[str]) -> None:
    """A val/test file set must have the training set's columns, with their types."""
    for name in used:
        if name not in files.schema.names:
            raise DataError(f"{files.location}: no column {name!r} (the training files have it)")
        if files.schema.field(name).type != reference.schema.field(name).type:
            raise DataError(f"{files.location}: column {name!r} is {files.schema.field(name).type}, the training "
                            f"files' is {reference.schema.field(name).type}")


def target_classes(files: ParquetFiles, target: str) -> int:
    """Classes of an integer target: its maximum + 1, from the row groups' statistics (else the column is read)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    high = -1
    for path in files.paths:
        with files.filesystem.open_input_file(path) as f:
            pfile = pq.ParquetFile(f)
            index = pfile.schema_arrow.get_field_index(target)
            for g in range(pfile.metadata.num_row_groups):
                stats = pfile.metadata.row_group(g).column(index).statistics
                if stats is not None and stats.has_min_max:
                    low, top = stats.min, stats.max
                else:
                    column = pfile.read_row_group(g, columns=[target]).column(0)
                    low, top = pc.min(column).as_py(), pc.max(column).as_py()
                if low is not None and low < 0:
                    raise DataError(f"data.target: {path} has class {low}; expected classes 0, 1, ...")
                high = max(high, top if top is not None else -1)
    return high + 1


def describe(cfg: Any) -> ParquetSource:
    """Check the job's Parquet data from metadata alone (before Ray starts) and say what a model needs to know."""
    import pyarrow.types as pat

    from dtrain.models.base import DataMeta

    if not cfg.path:
        raise ConfigError("data.path: required for data set 'parquet' (a file, folder, glob or URI)")
    if cfg.fourier or cfg.minmax:
        raise ConfigError(f"data.{'fourier' if cfg.fourier else 'minmax'}: not supported for data.name=parquet")
    train = scan(cfg.path, "data.path")
    features, target = columns_of(train, cfg.features, cfg.target)
    files = {"train": train, "val": None, "test": None}
    for split in ("val", "test"):
        location = getattr(cfg, f"{split}_path")
        if location:
            files[split] = scan(location, f"data.{split}_path")
            check_same_columns(files[split], train, [*features, *([target] if target else [])])
    kind = train.schema.field(target).type if target else None
    if target is None:
        meta = DataMeta((len(features),), task="unsupervised")
    elif pat.is_integer(kind) or pat.is_boolean(kind):
        meta = DataMeta((len(features),), num_classes=max(2, target_classes(train, target)))
    else:
        meta = DataMeta((len(features),), output_dim=1, task="regression")
    if train.num_rows == 0:
        raise DataError(f"data.path: {cfg.path} holds no rows")
    # a split with its own files takes no share of data.path's rows
    val_fraction = 0.0 if files["val"] is not None else cfg.val_fraction
    test_fraction = 0.0 if files["test"] is not None else cfg.test_fraction
    counts = {k: f.num_rows for k, f in files.items() if f is not None}
    if val_fraction or test_fraction:
        counts.pop("train")  # the seeded split decides: counted by the launcher
    return ParquetSource(files, features, target, meta, val_fraction, test_fraction, cfg.seed, counts)


# --- per-batch transforms (run by Ray Data's tasks, on numpy batches: {column: array}) ---

def split_of(batch: dict[str, np.ndarray], columns: list[str], seed: int, val_fraction: float,
             test_fraction: float) -> np.ndarray:
    """Which split each row falls in (0 train, 1 val, 2 test): a seeded hash of the row's values, so the same row
    lands in the same split in every pass, every run and every worker, with no row index needed."""
    n = len(batch[columns[0]])
    h = np.full(n, np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(seed & 0xFFFFFFFF), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in columns:
            bits = np.ascontiguousarray(batch[name], dtype=np.float64).view(np.uint64)
            h = (h ^ bits) * np.uint64(0x100000001B3)
            h ^= h >> np.uint64(29)
        h = (h ^ (h >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's finaliser
        h ^= h >> np.uint64(32)
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    val_edge = test_fraction + (1 - test_fraction) * val_fraction
    return np.where(u < test_fraction, 2, np.where(u < val_edge, 1, 0)).astype(np.int8)


def keep_split(batch: dict[str, np.ndarray], *, split: int, columns: list[str], seed: int, val_fraction: float,
               test_fraction: float) -> dict[str, np.ndarray]:
    """The batch's rows of one split (map_batches)."""
    mask = split_of(batch, columns, seed, val_fraction, test_fraction) == split
    return {k: v[mask] for k, v in batch.items()}


def split_moments(batch: dict[str, np.ndarray], *, columns: list[str], features: list[str], seed: int,
                  val_fraction: float, test_fraction: float) -> dict[str, np.ndarray]:
    """One row of partial statistics per batch (map_batches): rows per split, and the training rows' per-feature
    count, mean and sum of squared deviations, which combine_moments merges exactly (Chan et al.)."""
    split = split_of(batch, columns, seed, val_fraction, test_fraction) if val_fraction or test_fraction else \
        np.zeros(len(batch[columns[0]]), dtype=np.int8)
    counts = np.bincount(split, minlength=3)
    train = split == 0
    x = np.stack([np.asarray(batch[f], dtype=np.float64)[train] for f in features], axis=1) if features else \
        np.zeros((int(train.sum()), 0))
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    m2 = ((x - mean) ** 2).sum(axis=0)
    return {"counts": counts[None, :], "mean": mean[None, :], "m2": m2[None, :]}


def combine_moments(parts: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows per split, training mean, training population std) from split_moments' rows."""
    counts = np.zeros(3, dtype=np.int64)
    n, mean, m2 = 0, None, None
    for part in parts:
        k = int(part["counts"][0])
        counts += np.asarray(part["counts"], dtype=np.int64)
        if k == 0:
            continue
        if mean is None:
            n, mean, m2 = k, np.asarray(part["mean"], dtype=np.float64), np.asarray(part["m2"], dtype=np.float64)
            continue
        delta = part["mean"] - mean
        total = n + k
        mean = mean + delta * k / total
        m2 = m2 + part["m2"] + delta ** 2 * n * k / total
        n = total
    if mean is None:
        return counts, np.zeros(0), np.zeros(0)
    return counts, mean, np.sqrt(m2 / n)


def to_xy(batch: dict[str, np.ndarray], *, features: list[str], target: str | None, task: str,
          mean: np.ndarray | None, std: np.ndarray | None) -> dict[str, np.ndarray]:
    """The batch as {"x": (n, features) float32 (standardised with the training statistics), "y": targets}."""
    x = np.stack([np.asarray(batch[f], dtype=np.float32) for f in features], axis=1) if len(features) else None
    if mean is not None:
        x = ((x - mean) / std).astype(np.float32)
    out = {"x": x}
    if target is not None:
        out["y"] = np.asarray(batch[target], dtype=np.int64 if task == "classification" else np.float32)
    return out


def write_shards(x: np.ndarray, y: np.ndarray | None, dest: Path, rows_per_file: int, prefix: str = "part") -> int:
    """Write rows as Parquet files dest/<prefix>-00000.parquet, ... (columns f0..f<d-1>, label); returns files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dest.mkdir(parents=True, exist_ok=True)
    flat = x.reshape(len(x), -1)
    count = 0
    for count, start in enumerate(range(0, len(flat), rows_per_file), start=1):
        part = flat[start:start + rows_per_file]
        columns = {f"f{j}": pa.array(np.ascontiguousarray(part[:, j], dtype=np.float32)) for j in range(part.shape[1])}
        if y is not None:
            columns["label"] = pa.array(np.ascontiguousarray(y[start:start + rows_per_file]))
        pq.write_table(pa.table(columns), dest / f"{prefix}-{count - 1:05d}.parquet")
    return count
