"""Data sets read from files: MNIST-style IDX (optionally gzipped), NumPy .npz and CSV.

Every problem with a file (missing, unreadable, corrupt, wrong shape) raises DataError naming the file and what
was expected, so the CLI can print one clear line.
"""

from __future__ import annotations

import gzip
import zipfile
from pathlib import Path

import numpy as np

from dtrain.data.base import Arrays
from dtrain.data.transforms import all_finite
from dtrain.errors import DataError

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
TASKS = ("auto", "classification", "regression", "unsupervised")


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: {what} not found")
    return p


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (the MNIST format; gzip detected by its magic bytes) into an array of its declared shape."""
    p = _existing(path, "IDX file")
    if not p.is_file():
        raise DataError(f"{p}: expected an IDX file, found a directory")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise DataError(f"{p}: corrupt gzip data ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{p}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    dtype, ndim = np.dtype(_IDX_TYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(f"{p}: IDX header declares shape {shape} ({expected} bytes of data), "
                        f"the file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"{folder}: missing {stem} (or {stem}.gz); expected the four MNIST IDX files")


def mnist(path: str) -> Arrays:
    """MNIST (or Fashion-MNIST) from a folder with the four IDX files, e.g. train-images-idx3-ubyte[.gz].

    Images come as (N, 1, 28, 28) float32 scaled to [0, 1]; the file's own train/test split is kept.
    """
    folder = _existing(path, "MNIST folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: expected a folder holding the MNIST IDX files")
    split = {}
    for part, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find_idx(folder, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find_idx(folder, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1:
            raise DataError(f"{folder}: {prefix} images must be 3-d and labels 1-d IDX arrays, "
                            f"got shapes {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise DataError(f"{folder}: {len(images)} {prefix} images but {len(labels)} labels")
        split[part] = ((images[:, None] / 255.0).astype(np.float32), labels.astype(np.int64))
    num_classes = int(max(split["train"][1].max(initial=0), split["test"][1].max(initial=0))) + 1
    x = np.concatenate([split["train"][0], split["test"][0]])
    y = np.concatenate([split["train"][1], split["test"][1]])
    return Arrays(x, y, "classification", num_classes=num_classes, split=split)


def _task_of(y: np.ndarray | None, task: str, where: str) -> str:
    if task not in TASKS:
        raise DataError(f"{where}: data.options.task: expected one of {', '.join(TASKS)}, got {task!r}")
    if y is None:
        if task not in ("auto", "unsupervised"):
            raise DataError(f"{where}: task {task!r} needs targets, but none were found")
        return "unsupervised"
    if task != "auto":
        return task
    integral = np.issubdtype(y.dtype, np.integer) or (y.size > 0 and np.all(np.mod(y, 1) == 0))
    return "classification" if integral and y.ndim == 1 else "regression"


def _arrays(x: np.ndarray, y: np.ndarray | None, task: str, where: str,
            split: dict | None = None) -> Arrays:
    """Check shapes and types, then wrap x, y as Arrays for `task`."""
    if x.ndim == 0 or len(x) == 0:
        raise DataError(f"{where}: no samples")
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise DataError(f"{where}: features must be numeric, got dtype {x.dtype}")
    if y is not None and len(y) != len(x):
        raise DataError(f"{where}: {len(x)} samples but {len(y)} targets")
    x = x.astype(np.float32, copy=False)
    if not all_finite(x):
        raise DataError(f"{where}: features contain NaN or infinite values")
    task = _task_of(y, task, where)
    num_classes = 0
    if task == "classification":
        if np.any(y < 0) or np.any(np.mod(y, 1) != 0):
            raise DataError(f"{where}: classification targets must be integers 0..K-1")
        y = y.astype(np.int64)
        num_classes = int(y.max()) + 1
    elif y is not None:
        y = y.astype(np.float32).reshape(len(y), -1)
    return Arrays(x, y, task, num_classes=num_classes, split=split)


def npz(path: str, x: str = "x", y: str | None = "y", task: str = "auto") -> Arrays:
    """Arrays from a NumPy .npz: keys x (and y), or x_train/y_train/x_test/y_test for a fixed split.

    A missing y key means unsupervised data; task auto picks classification for 1-d integer targets.
    """
    p = _existing(path, ".npz file")
    try:
        loaded = np.load(p, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{p}: expected an .npz archive of named arrays, got a single .npy array")
        with loaded as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as err:
        raise DataError(f"{p}: not a readable .npz file ({(str(err).splitlines() or ['corrupt'])[0]})") from None
    if f"{x}_train" in arrays and f"{x}_test" in arrays:
        parts = {}
        for part in ("train", "test"):
            ys = arrays.get(f"{y}_{part}") if y else None
            parts[part] = _arrays(arrays[f"{x}_{part}"], ys, task, f"{p} ({part})")
        train, test = parts["train"], parts["test"]
        if train.x.shape[1:] != test.x.shape[1:]:
            raise DataError(f"{p}: train samples have shape {train.x.shape[1:]}, test samples {test.x.shape[1:]}")
        ys = None if train.y is None else np.concatenate([train.y, test.y])
        out = _arrays(np.concatenate([train.x, test.x]), ys, train.task, str(p),
                      split={"train": (train.x, train.y), "test": (test.x, test.y)})
        return out
    if x not in arrays:
        raise DataError(f"{p}: no array named {x!r} (found: {', '.join(sorted(arrays)) or 'none'})")
    return _arrays(arrays[x], arrays.get(y) if y else None, task, str(p))


def csv(path: str, target: str | int | None = -1, header: bool | None = None, delimiter: str = ",",
        task: str = "auto") -> Arrays:
    """A numeric CSV table: one sample per row, the `target` column (name or index; null: none) as the label.

    header: None detects a first row that is not numeric.
    """
    p = _existing(path, "CSV file")
    try:
        lines = [ln for ln in p.read_text().splitlines() if ln.strip()]
    except (UnicodeDecodeError, OSError) as err:
        raise DataError(f"{p}: not a readable text CSV file ({err.__class__.__name__})") from None
    if not lines:
        raise DataError(f"{p}: empty CSV file")
    rows = [[c.strip() for c in ln.split(delimiter)] for ln in lines]
    if header is None:
        header = not all(_is_number(c) for c in rows[0])
    names, body = (rows[0], rows[1:]) if header else ([str(i) for i in range(len(rows[0]))], rows)
    if not body:
        raise DataError(f"{p}: no data rows")
    width = len(names)
    for i, row in enumerate(body):
        if len(row) != width:
            raise DataError(f"{p}: line {i + 1 + int(header)} has {len(row)} columns, expected {width}")
    try:
        table = np.array(body, dtype=np.float64)
    except ValueError:
        bad = next((i, c) for i, row in enumerate(body) for c in row if not _is_number(c))
        raise DataError(f"{p}: line {bad[0] + 1 + int(header)}: {bad[1]!r} is not a number") from None
    if target is None:
        return _arrays(table, None, task, str(p))
    col = _column(target, names, p)
    return _arrays(np.delete(table, col, axis=1), table[:, col], task, str(p))


def _column(target: str | int, names: list[str], p: Path) -> int:
    if isinstance(target, int) or (isinstance(target, str) and target.lstrip("-").isdigit() and target not in names):
        idx = int(target)
        if not -len(names) <= idx < len(names):
            raise DataError(f"{p}: target column {idx} out of range for {len(names)} columns")
        return idx % len(names)
    if target not in names:
        raise DataError(f"{p}: no column named {target!r} (columns: {', '.join(names)})")
    return names.index(target)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
