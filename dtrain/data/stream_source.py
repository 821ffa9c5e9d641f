"""Files streamed through Ray Data, never loaded whole (docs/streaming.md): data.name parquet, images, or csv and
npz with data.stream=true. What the driver learns before anything is read beyond metadata (each format's: a Parquet
file's footer, a CSV file's header and first block, the headers of an .npz file's arrays, an image's header; the
files per split, the columns used, the task), as a StreamSource; and the Parquet writer behind `dtrain data
convert`. pyarrow and PIL only: the launcher builds the Ray Data pipeline from a StreamSource
(dtrain.launch.stream), whose per-batch transforms are dtrain.data.stream_batches.
"""

from __future__ import annotations

import glob
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dtrain.errors import ConfigError, DataError, first_line

if TYPE_CHECKING:  # Ray Data's workers need not import torch
    from dtrain.models.base import DataMeta

FORMATS = {"parquet": (".parquet", ".parq"), "csv": (".csv",), "npz": (".npz",),
           "images": (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")}
"""Streamed formats and the file names read from a folder."""
ALWAYS_STREAMED = ("parquet", "images")
"""Data sets that only stream; csv and npz stream with data.stream=true (else one local file is loaded into memory)."""
NAMED = {"parquet": "Parquet", "csv": "CSV", "npz": ".npz"}


@dataclass
class SourceFiles:
    """One split's files: where they are (a pyarrow filesystem and paths in it) and what their metadata holds."""

    location: str
    """As the user wrote it (data.path, data.val_path, data.test_path)."""
    filesystem: Any
    paths: list[str]
    rows: list[int] | None
    """Rows per file, where the format's metadata tells (Parquet, npz, images); CSV's are counted by Ray Data."""
    schema: Any
    """The columns (a pyarrow schema; an .npz file's arrays with more than one value per row are fixed-shape
    tensor columns; None for images)."""
    fmt: str = "parquet"
    root: str | None = None
    """The folder the files were found under (filesystem path), when a folder was given."""

    @property
    def num_rows(self) -> int | None:
        return None if self.rows is None else sum(self.rows)


@dataclass
class StreamSource:
    """What the driver knows of a streamed data set before anything is read: its files per split (val/test None
    when they come from the seeded split of data.path), the columns used, the task."""

    files: dict[str, SourceFiles | None]
    features: list[str]
    target: str | None
    meta: DataMeta
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    """Rows per split, when the metadata tells (own files); the rest are counted by the launcher."""
    fmt: str = "parquet"
    count_classes: bool = False
    """The classes of an integer target are counted by the launcher's pass (CSV: no statistics in the files)."""
    read: dict[str, Any] = field(default_factory=dict)
    """Format-specific read arguments (CSV: column types; images: size, mode, classes, shape)."""


def streams(cfg: Any) -> bool:
    """Whether the job's data streams through Ray Data (data.name, data.stream: see DataConfig.stream)."""
    if cfg.name in ALWAYS_STREAMED or cfg.stream:
        return True
    if cfg.name in ("csv", "npz") and cfg.path and (any(c in cfg.path for c in "*?[") or "://" in cfg.path
                                                    or Path(cfg.path).expanduser().is_dir()):
        raise ConfigError(f"data.path: {cfg.path} is not one local file; set data.stream=true to stream {cfg.name} "
                          f"files through Ray Data (data.name={cfg.name} alone loads one local file into memory)")
    return False


def open_location(location: str, key: str, fmt: str = "parquet") -> tuple[Any, list[str], str | None]:
    """(filesystem, the fmt files, the folder they are under or None) of a local file, folder or glob, or a URI
    (s3://, gs://, ...)."""
    from pyarrow import fs as pafs

    from dtrain.storage import is_uri, open_uri

    if is_uri(location):
        filesystem, path = open_uri(location, key)
        try:
            info = filesystem.get_file_info(path)
            if info.type == pafs.FileType.File:
                return filesystem, [path], None
            found = filesystem.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        except OSError as err:
            from dtrain.storage import _reason

            raise DataError(f"{key}: cannot read {location}: {_reason(err)}") from None
        if info.type == pafs.FileType.NotFound and not found:
            raise DataError(f"{key}: {location} not found")
        return filesystem, sorted(i.path for i in found if i.type == pafs.FileType.File and _is(fmt, i.path)), \
            path.rstrip("/")
    local = Path(location).expanduser()
    root = None
    if any(c in location for c in "*?["):
        matches = sorted(glob.glob(str(local), recursive=True))
        if not matches:
            raise DataError(f"{key}: {location} matches no file")
        files = [m for m in matches if Path(m).is_file()]
    elif local.is_file():
        files = [str(local)]
    elif local.is_dir():
        files = sorted(str(p) for p in local.rglob("*") if p.is_file() and _is(fmt, str(p)))
        root = str(local.resolve())
    else:
        raise DataError(f"{key}: {location} not found")
    return pafs.LocalFileSystem(), [str(Path(f).resolve()) for f in files], root


def _is(fmt: str, path: str) -> bool:
    name = posixpath.basename(path)
    return name.lower().endswith(FORMATS[fmt]) and not name.startswith((".", "_"))


def _parquet_meta(f: Any) -> tuple[Any, int]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(f).metadata
    return meta.schema.to_arrow_schema(), meta.num_rows


def _csv_meta(f: Any) -> tuple[Any, None]:
    """The header and the types pyarrow infers from the first block (nothing more is read)."""
    import pyarrow.csv as pacsv

    reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(use_threads=False))
    try:
        if reader.read_next_batch().num_rows == 0:
            raise StopIteration
    except StopIteration:
        raise ValueError("no rows, a header only") from None
    return reader.schema, None


def _npz_meta(f: Any) -> tuple[Any, int]:
    """The arrays of an .npz file (its columns: name, dtype, shape of one row) and its rows, from the arrays'
    headers; every array has the same number of rows."""
    import zipfile

    import pyarrow as pa

    fields, rows = [], {}
    with zipfile.ZipFile(f) as archive:
        for member in archive.namelist():
            with archive.open(member) as npy:
                major, _ = np.lib.format.read_magic(npy)
                header = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}.get(major)
                if header is None:
                    raise ValueError(f"array {member}: .npy format version {major} (expected 1 or 2)")
                shape, _, dtype = header(npy)
            name = member.removesuffix(".npy")
            if not shape:
                raise ValueError(f"array {name!r} is a scalar, expected one row per sample")
            if dtype.hasobject or dtype.fields:
                raise ValueError(f"array {name!r} holds {dtype} values, expected numbers")
            kind = pa.from_numpy_dtype(dtype)
            fields.append(pa.field(name, pa.fixed_shape_tensor(kind, shape[1:]) if shape[1:] else kind))
            rows[name] = shape[0]
    if len(set(rows.values())) > 1:
        raise ValueError("its arrays differ in rows (" + ", ".join(f"{k}: {v}" for k, v in rows.items()) + ")")
    if not rows:
        raise ValueError("no arrays")
    return pa.schema(fields), next(iter(rows.values()))


def scan(location: str, key: str, fmt: str = "parquet") -> SourceFiles:
    """The files at location and each one's columns (and rows, where the metadata tells); every file must have the
    same columns. DataError naming the file for a missing, empty, corrupt or mismatched one."""
    filesystem, paths, root = open_location(location, key, fmt)
    if not paths:
        raise DataError(f"{key}: {location} holds no {FORMATS[fmt][0] if fmt != 'images' else 'image'} file")
    read = {"parquet": _parquet_meta, "csv": _csv_meta, "npz": _npz_meta}[fmt]
    what = NAMED[fmt]
    rows, schema, first = [], None, None
    for path in paths:
        try:
            with filesystem.open_input_file(path) as f:
                file_schema, count = read(f)
        except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError for a corrupt file
            raise DataError(f"{key}: {path}: not a readable {what} file ({first_line(err)[:120]})") from None
        if schema is None:
            schema, first = file_schema, path
        else:
            schema = _same_columns(schema, file_schema, fmt, f"{key}: {path}", first)
        rows.append(count)
    return SourceFiles(location, filesystem, paths, None if fmt == "csv" else rows, schema, fmt, root)


def _same_columns(schema: Any, other: Any, fmt: str, where: str, first: str) -> Any:
    """The schema both files share: Parquet's and npz's must be equal; CSV's must have the same names, and a column
    that is a number in one file is a number in the other (an integer and a float column read as float)."""
    import pyarrow as pa

    if fmt != "csv" and not other.equals(schema) or other.names != schema.names:
        raise DataError(f"{where}: its columns ({_columns(other)}) differ from {first}'s ({_columns(schema)})")
    merged = []
    for mine, theirs in zip(schema, other, strict=True):
        if mine.type != theirs.type:
            if not (_numeric(mine.type) and _numeric(theirs.type)):
                raise DataError(f"{where}: column {mine.name!r} is {theirs.type}, {first}'s is {mine.type}")
            mine = pa.field(mine.name, pa.float64())
        merged.append(mine)
    return pa.schema(merged)


def _numeric(kind: Any) -> bool:
    """A number per row, or a tensor of numbers (an .npz array)."""
    import pyarrow as pa
    import pyarrow.types as pat

    if isinstance(kind, pa.FixedShapeTensorType):
        kind = kind.value_type
    return pat.is_integer(kind) or pat.is_floating(kind) or pat.is_boolean(kind)


def _row_shape(kind: Any) -> tuple[int, ...]:
    """The shape of a column's value in one row: () for a number."""
    import pyarrow as pa

    return tuple(kind.shape) if isinstance(kind, pa.FixedShapeTensorType) else ()


def _columns(schema: Any) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def columns_of(files: SourceFiles, features: list[str] | None, target: str | None) -> tuple[list[str], str | None]:
    """The feature and target columns (features default to every column but the target); each one numeric."""
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
        if not _numeric(kind):
            raise DataError(f"data.features: column {name!r} of {files.location} is {kind}, expected a number")
    if target is not None and _row_shape(files.schema.field(target).type):
        raise DataError(f"data.target: {target!r} of {files.location} holds "
                        f"{_row_shape(files.schema.field(target).type)} values per row, expected one number")
    return features, target


def check_same_columns(files: SourceFiles, reference: SourceFiles, features: list[str], target: str | None) -> None:
    """A val/test file set must have the training set's columns: numeric features, a target of the same kind."""
    for name in [*features, *([target] if target else [])]:
        if name not in files.schema.names:
            raise DataError(f"{files.location}: no column {name!r} (the training files have it)")
        mine, theirs = files.schema.field(name).type, reference.schema.field(name).type
        if not _numeric(mine) or _row_shape(mine) != _row_shape(theirs) or \
                name == target and _is_class(mine) != _is_class(theirs):
            raise DataError(f"{files.location}: column {name!r} is {mine}, the training files' is {theirs}")


def _is_class(kind: Any) -> bool:
    import pyarrow.types as pat

    return pat.is_integer(kind) or pat.is_boolean(kind)


def target_classes(files: SourceFiles, target: str) -> int:
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


def check_streamable(cfg: Any) -> None:
    """What every streamed data set needs: a path, and no in-memory-only transform."""
    if not cfg.path:
        raise ConfigError(f"data.path: required for data set {cfg.name!r} (a file, folder, glob or URI)")
    if cfg.fourier or cfg.minmax:
        raise ConfigError(f"data.{'fourier' if cfg.fourier else 'minmax'}: not supported for a streamed data set "
                          f"(data.name={cfg.name})")


def describe(cfg: Any) -> StreamSource:
    """Check the job's Parquet or CSV files from metadata alone (before Ray starts) and say what a model needs to
    know (images: dtrain.data.stream_images.describe_images)."""
    import pyarrow as pa

    from dtrain.models.base import DataMeta

    check_streamable(cfg)
    fmt = cfg.name
    train = scan(cfg.path, "data.path", fmt)
    target = cfg.target
    if fmt == "npz" and target == "label" and "label" not in train.schema.names and "y" in train.schema.names:
        target = "y"  # the arrays of an .npz data set are x and y (dtrain.data.files.npz)
    features, target = columns_of(train, cfg.features, target)
    files: dict[str, SourceFiles | None] = {"train": train, "val": None, "test": None}
    for split in ("val", "test"):
        location = getattr(cfg, f"{split}_path")
        if location:
            files[split] = scan(location, f"data.{split}_path", fmt)
            check_same_columns(files[split], train, features, target)
    kind = train.schema.field(target).type if target else None
    shapes = [_row_shape(train.schema.field(f).type) for f in features]
    shape = shapes[0] if len(shapes) == 1 and shapes[0] else (sum(int(np.prod(s)) for s in shapes),)
    if target is None:
        meta = DataMeta(shape, task="unsupervised")
    elif _is_class(kind):
        meta = DataMeta(shape, num_classes=max(2, target_classes(train, target)) if fmt == "parquet" else 2)
    else:
        meta = DataMeta(shape, output_dim=1, task="regression")
    if train.num_rows == 0:
        raise DataError(f"data.path: {cfg.path} holds no rows")
    read = {}
    if fmt == "csv":  # every file read with the same types (pyarrow infers them per file otherwise)
        types = {f: pa.float64() for f in features} | ({target: kind} if target else {})
        read = {"column_types": types, "columns": [*features, *([target] if target else [])]}
    return _source(cfg, files, features, target, meta, fmt, read,
                   count_classes=fmt != "parquet" and bool(meta.num_classes))


def _source(cfg: Any, files: dict[str, SourceFiles | None], features: list[str], target: str | None,
            meta: DataMeta, fmt: str, read: dict[str, Any], count_classes: bool = False) -> StreamSource:
    # a split with its own files takes no share of data.path's rows
    val_fraction = 0.0 if files["val"] is not None else cfg.val_fraction
    test_fraction = 0.0 if files["test"] is not None else cfg.test_fraction
    counts = {k: f.num_rows for k, f in files.items() if f is not None and f.num_rows is not None}
    if val_fraction or test_fraction:
        counts.pop("train", None)  # the seeded split decides: counted by the launcher
    return StreamSource(files, features, target, meta, val_fraction, test_fraction, cfg.seed, counts, fmt,
                        bool(count_classes), read)


def write_shards(x: np.ndarray, y: np.ndarray | None, dest: Path, rows_per_file: int, fmt: str = "parquet") -> int:
    """Write rows as files dest/part-00000.<fmt>, ...: Parquet (columns f0..f<d-1>, label) or .npz (arrays x, with
    each sample's shape, and y); returns how many files."""
    dest.mkdir(parents=True, exist_ok=True)
    write = _write_npz if fmt == "npz" else _write_parquet
    count = 0
    for count, start in enumerate(range(0, len(x), rows_per_file), start=1):
        part_y = None if y is None else y[start:start + rows_per_file]
        write(x[start:start + rows_per_file], part_y, dest / f"part-{count - 1:05d}.{fmt}")
    return count


def _write_parquet(x: np.ndarray, y: np.ndarray | None, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    flat = x.reshape(len(x), -1)
    columns = {f"f{j}": pa.array(np.ascontiguousarray(flat[:, j], dtype=np.float32)) for j in range(flat.shape[1])}
    if y is not None:
        columns["label"] = pa.array(np.ascontiguousarray(y))
    pq.write_table(pa.table(columns), path)


def _write_npz(x: np.ndarray, y: np.ndarray | None, path: Path) -> None:
    np.savez(path, **({"x": x} if y is None else {"x": x, "y": y}))
