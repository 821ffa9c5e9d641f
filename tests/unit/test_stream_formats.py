"""The streamed formats beyond Parquet, without Ray: CSV files described from their header and first block, .npz
files from their arrays' headers (and read as their rows), an ImageFolder described from its listing and the images'
headers, and the per-batch transforms that carry a tensor column (images' pixels) through the seeded split, the
statistics and the (C, H, W) input of a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
from PIL import Image

from dtrain.data.config import DataConfig
from dtrain.data.stream_batches import (
    combine_moments,
    image_rows,
    npz_rows,
    split_moments,
    split_of,
    target_range,
    to_xy,
)
from dtrain.data.stream_images import describe_images
from dtrain.data.stream_source import describe
from dtrain.errors import DataError


def _csv(path: Path, n: int, a_type=np.float64, label_offset: int = 0) -> None:
    rng = np.random.default_rng(n)
    pacsv.write_csv(pa.table({"a": rng.normal(size=n).astype(a_type) if a_type is not np.int64 else np.arange(n),
                              "b": rng.normal(size=n), "label": (np.arange(n) % 3 + label_offset)}), path)


def test_csv_files_are_described_from_their_headers_and_read_with_one_set_of_types(tmp_path):
    _csv(tmp_path / "part-0.csv", 30)
    _csv(tmp_path / "part-1.csv", 20, a_type=np.int64)  # an integer column here, a float one there: read as float
    source = describe(DataConfig(name="csv", stream=True, path=str(tmp_path)))
    assert source.fmt == "csv" and source.features == ["a", "b"] and source.target == "label"
    assert [Path(p).name for p in source.files["train"].paths] == ["part-0.csv", "part-1.csv"]
    assert source.files["train"].num_rows is None and "train" not in source.counts  # counted by Ray Data
    assert source.count_classes and source.meta.task == "classification"  # the classes too
    assert source.read["column_types"] == {"a": pa.float64(), "b": pa.float64(), "label": pa.int64()}
    regression = describe(DataConfig(name="csv", stream=True, path=str(tmp_path), target="b"))
    assert regression.meta.task == "regression" and not regression.count_classes


def test_npz_files_are_described_from_their_arrays_headers_and_read_as_their_rows(tmp_path):
    rng = np.random.default_rng(0)
    parts = [(rng.normal(size=(n, 1, 2, 3)).astype(np.float32), np.arange(n) % 4 + (n == 7)) for n in (5, 7)]
    for i, (x, y) in enumerate(parts):
        np.savez(tmp_path / f"part-{i}.npz", x=x, y=y)
    source = describe(DataConfig(name="npz", stream=True, path=str(tmp_path), val_path=str(tmp_path / "part-1.npz")))
    assert source.fmt == "npz" and source.features == ["x"] and source.target == "y"  # no label array: y
    assert source.files["train"].rows == [5, 7] and source.counts == {"val": 7}  # train: the seeded split's
    assert source.meta.input_shape == (1, 2, 3) and source.meta.task == "classification" and source.count_classes
    two = describe(DataConfig(name="npz", stream=True, path=str(tmp_path), target=None, features=["y", "x"]))
    assert two.meta.task == "unsupervised" and two.meta.input_shape == (7,)  # flattened side by side
    batch = {"bytes": np.array([(tmp_path / f"part-{i}.npz").read_bytes() for i in range(2)], dtype=object)}
    rows = npz_rows(batch, columns=["x", "y"])
    assert rows["x"].shape == (12, 1, 2, 3) and rows["x"].dtype == np.float32
    assert np.array_equal(rows["x"], np.concatenate([x for x, _ in parts]))
    assert np.array_equal(rows["y"], np.concatenate([y for _, y in parts]))


def test_a_tensor_column_is_split_standardised_and_shaped_per_element():
    rng = np.random.default_rng(0)
    pixels = rng.uniform(0, 1, (500, 1, 4, 3)).astype(np.float32)
    pixels[:, 0, 0, 0] = 0.0  # a constant pixel
    batch = {"pixels": pixels, "label": rng.integers(0, 5, 500)}
    kw = {"columns": ["pixels", "label"], "seed": 3, "val_fraction": 0.1, "test_fraction": 0.2}
    split = split_of(batch, **kw)
    assert np.array_equal(split[250:], split_of({k: v[250:] for k, v in batch.items()}, **kw))
    changed = {"pixels": pixels.copy(), "label": batch["label"]}
    changed["pixels"][:, 0, 3, 2] += 0.5  # every row's last pixel: the hash sees every element
    assert (split_of(changed, **kw) != split).mean() > 0.2
    parts = [{k: v[0] for k, v in split_moments({c: x[s:s + 90] for c, x in batch.items()}, features=["pixels"],
                                                 target="label", **kw).items()} for s in range(0, 500, 90)]
    counts, mean, std = combine_moments(parts)
    train = pixels[split == 0].reshape(-1, 12)
    assert counts.tolist() == np.bincount(split, minlength=3).tolist()
    np.testing.assert_allclose(mean, train.mean(0), rtol=1e-6)
    np.testing.assert_allclose(std, train.std(0), rtol=1e-5)
    assert target_range(parts) == (batch["label"].min(), batch["label"].max())
    std[std < 1e-8] = 1.0
    out = to_xy(batch, features=["pixels"], target="label", task="classification", mean=mean.astype(np.float32),
                std=std.astype(np.float32), shape=(1, 4, 3))
    assert out["x"].shape == (500, 1, 4, 3) and out["x"].dtype == np.float32 and out["y"].dtype == np.int64
    np.testing.assert_allclose(out["x"][split == 0].reshape(-1, 12).mean(0), 0, atol=1e-5)
    flat = to_xy({"a": np.arange(3.0), "b": np.ones(3)}, features=["a", "b"], target=None, task="unsupervised",
                 mean=None, std=None)
    assert flat["x"].tolist() == [[0, 1], [1, 1], [2, 1]] and "y" not in flat


def test_image_rows_are_pixels_in_0_1_as_c_h_w_with_the_class_of_their_folder():
    gray = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) * 10
    batch = {"image": gray, "path": np.array(["/d/cat/1.png", "/d/dog/x/2.png"])}
    out = image_rows(batch, classes=["ant", "cat", "dog"], root="/d", shape=(1, 3, 4))
    assert out["pixels"].shape == (2, 1, 3, 4) and out["pixels"].dtype == np.float32
    np.testing.assert_allclose(out["pixels"][:, 0], gray / 255.0)
    assert out["label"].tolist() == [1, 2]
    rgb = np.zeros((1, 3, 4, 3), dtype=np.uint8)
    rgb[..., 2] = 255
    out = image_rows({"image": rgb, "path": np.array(["/d/ant/a.png"])}, classes=["ant"], root="/d", shape=(3, 3, 4))
    assert out["pixels"].shape == (1, 3, 3, 4) and out["pixels"][0, 2].min() == 1.0 and out["pixels"][0, 0].max() == 0
    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros((3, 4), np.uint8), np.zeros((5, 4), np.uint8)
    with pytest.raises(DataError, match=r"an image of shape \(5, 4\).*data.options.size"):
        image_rows({"image": ragged, "path": batch["path"]}, classes=["cat", "dog"], root="/d", shape=(1, 3, 4))


def _images(d: Path, sizes: dict[str, tuple[int, int]], mode: str = "L") -> None:
    for i, (name, (w, h)) in enumerate(sizes.items()):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, (w, h), color=i * 20 if mode == "L" else (i, 2, 3)).save(d / name)


def test_an_image_folder_is_described_from_its_listing_and_headers(tmp_path):
    _images(tmp_path / "set", {"b/1.png": (6, 4), "a/2.png": (6, 4), "c/3.png": (6, 4), "c/4.png": (6, 4)})
    source = describe_images(DataConfig(name="images", path=str(tmp_path / "set")))
    assert source.read["classes"] == ["a", "b", "c"] and source.meta.num_classes == 3
    assert source.meta.input_shape == (1, 4, 6) and source.files["train"].num_rows == 4
    assert source.features == ["pixels"] and source.target == "label"
    resized = describe_images(DataConfig(name="images", path=str(tmp_path / "set"),
                                         options={"size": [8, 8], "mode": "RGB"}))
    assert resized.meta.input_shape == (3, 8, 8) and resized.read["mode"] == "RGB"
    _images(tmp_path / "mixed", {"a/1.png": (6, 4), "b/2.png": (6, 5)})
    with pytest.raises(DataError, match=r"mixed/b/2.png is 5x6 \(H x W\), .*a/1.png is 4x6; set data.options.size"):
        describe_images(DataConfig(name="images", path=str(tmp_path / "mixed")))
    assert describe_images(DataConfig(name="images", path=str(tmp_path / "mixed"),
                               options={"size": [4, 6]})).meta.input_shape == (1, 4, 6)
