"""The per-batch transforms of a streamed data set (docs/streaming.md), run by Ray Data's tasks on numpy batches
({column: array}): the seeded split, the one-pass statistics, images to pixel tensors, and features and target as
the arrays a worker trains on. numpy only: each of Ray Data's worker processes imports this module, and one that
imported torch would spend seconds and hundreds of MB on it.

A feature column is a scalar per row (shape (n,)) or a tensor per row (shape (n, ...): an image's pixels, a
Parquet tensor column); the features of a row are its columns' values flattened and concatenated, then shaped as
the model's input (DataMeta.input_shape). Statistics are per element of that vector: per feature, per pixel.
"""

from __future__ import annotations

import io

import numpy as np

from dtrain.errors import DataError

SPLITS = ("train", "val", "test")
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _flat(batch: dict[str, np.ndarray], columns: list[str], dtype: type) -> np.ndarray:
    """The columns' values per row, flattened and side by side: (n, total elements)."""
    parts = [np.asarray(batch[c], dtype=dtype) for c in columns]
    return np.concatenate([p.reshape(len(p), -1) for p in parts], axis=1)


def split_of(batch: dict[str, np.ndarray], columns: list[str], seed: int, val_fraction: float,
             test_fraction: float) -> np.ndarray:
    """Which split each row falls in (0 train, 1 val, 2 test): a seeded hash of the row's values, so the same row
    lands in the same split in every pass, every run and every worker, with no row index needed."""
    n = len(batch[columns[0]])
    h = np.full(n, _MIX ^ np.uint64(seed & 0xFFFFFFFF), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in columns:
            values = np.ascontiguousarray(batch[name], dtype=np.float64)
            bits = values.view(np.uint64)
            if values.ndim > 1:  # a tensor column: its elements weighted by position, summed (wrapping) per row
                bits = bits.reshape(n, -1)
                weights = np.arange(1, bits.shape[1] + 1, dtype=np.uint64) * _MIX | np.uint64(1)
                bits = ((bits ^ (bits >> np.uint64(31))) * weights).sum(axis=1, dtype=np.uint64)
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
                  val_fraction: float, test_fraction: float, target: str | None = None) -> dict[str, np.ndarray]:
    """One row of partial statistics per batch (map_batches): rows per split, the training rows' per-feature
    count, mean and sum of squared deviations, which combine_moments merges exactly (Chan et al.), and the
    target's range over all rows (classes, for formats whose metadata does not tell)."""
    n = len(batch[columns[0]])
    split = split_of(batch, columns, seed, val_fraction, test_fraction) if val_fraction or test_fraction else \
        np.zeros(n, dtype=np.int8)
    counts = np.bincount(split, minlength=3)
    train = split == 0
    x = _flat(batch, features, np.float64)[train] if features else np.zeros((int(train.sum()), 0))
    mean = x.mean(axis=0) if len(x) else np.zeros(x.shape[1])
    m2 = ((x - mean) ** 2).sum(axis=0)
    y = np.asarray(batch[target], dtype=np.float64) if target is not None and n else np.zeros(1)
    return {"counts": counts[None, :], "mean": mean[None, :], "m2": m2[None, :],
            "range": np.array([[y.min(), y.max()]])}


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


def target_range(parts: list[dict[str, np.ndarray]]) -> tuple[float, float]:
    """The target's (lowest, highest) value over split_moments' rows of non-empty batches."""
    ranges = [p["range"] for p in parts if int(np.sum(p["counts"]))]
    return (min(float(r[0]) for r in ranges), max(float(r[1]) for r in ranges)) if ranges else (0.0, -1.0)


def to_xy(batch: dict[str, np.ndarray], *, features: list[str], target: str | None, task: str,
          mean: np.ndarray | None, std: np.ndarray | None, shape: tuple[int, ...] | None = None
          ) -> dict[str, np.ndarray]:
    """The batch as {"x": (n, *shape) float32 (standardised with the training statistics), "y": targets}; shape:
    one row's input shape (default: the flat feature vector)."""
    x = _flat(batch, features, np.float32)
    if mean is not None:
        x = ((x - mean) / std).astype(np.float32)
    out = {"x": x.reshape(len(x), *shape) if shape else x}
    if target is not None:
        out["y"] = np.asarray(batch[target], dtype=np.int64 if task == "classification" else np.float32)
    return out


def npz_rows(batch: dict[str, np.ndarray], *, columns: list[str]) -> dict[str, np.ndarray]:
    """read_binary_files' rows (the bytes of one .npz file each) as the rows of the files' arrays named columns."""
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for data in batch["bytes"]:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            for c in columns:
                parts[c].append(archive[c])
    # one file per batch (map_batches' batch_size=1): its arrays as they are, not copied once more
    return {c: arrays[0] if len(arrays) == 1 else np.concatenate(arrays) for c, arrays in parts.items()}


def image_rows(batch: dict[str, np.ndarray], *, classes: list[str], root: str,
               shape: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """read_images' rows ({"image": (n, H, W[, C]) uint8, "path": root/<class>/...}) as {"pixels": (n, C, H, W)
    float32 in [0, 1], "label": class id (the class folder's index in the sorted class list)}."""
    images = batch["image"]
    if images.dtype == object or images.shape[1:3] != shape[1:] or (images.ndim == 4 and images.shape[3] != shape[0]):
        sizes = sorted({tuple(np.shape(i)) for i in images} - {(shape[1], shape[2], shape[0]), shape[1:]})
        raise DataError(f"data.path: an image of shape {sizes[0] if sizes else images.shape[1:]} (H, W[, C]) among "
                        f"images of {shape[1]}x{shape[2]}x{shape[0]}; set data.options.size: [H, W] (and mode) to "
                        "resize every image")
    pixels = images.astype(np.float32) / 255.0
    pixels = pixels[:, None] if pixels.ndim == 3 else pixels.transpose(0, 3, 1, 2)
    index = {name: i for i, name in enumerate(classes)}
    start = len(root) + 1
    labels = [index[str(p)[start:].split("/", 1)[0]] for p in batch["path"]]
    return {"pixels": pixels, "label": np.array(labels, dtype=np.int64)}


def check_classes(low: float, high: float, where: str) -> int:
    """Classes of an integer target from its range: its maximum + 1 (at least 2)."""
    if low < 0:
        raise DataError(f"data.target: {where} has class {low:g}; expected classes 0, 1, ...")
    return max(2, int(high) + 1)
