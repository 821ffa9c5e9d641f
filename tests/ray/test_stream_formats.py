"""The streamed formats beyond Parquet through Ray (on the session's Ray, in this process): digits written as PNG
images in class folders by `dtrain data convert --format images`, streamed by Ray Data's read_images to 2 DDP
workers training the CNN of jobs/cnn_digits.yaml on (1, 8, 8) pixels; the same images as .npz shards of (1, 8, 8)
arrays (`--format npz`) training that CNN as they stream; CSV files read by Ray Data's read_csv,
counted and typed by the pass that takes the statistics, and an image of another size found by that pass (no
training)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pytest
import yaml
from PIL import Image

from dtrain.cli import main
from dtrain.data.config import DataConfig
from dtrain.data.stream_batches import split_of
from dtrain.data.stream_images import describe_images
from dtrain.data.stream_source import describe
from dtrain.errors import DataError
from dtrain.launch.stream import prepare
from tests.helpers import JOBS

EPOCHS = 4


def test_digits_as_png_folders_stream_to_2_workers_training_the_cnn(ray_session, tmp_path, capfd):
    data = tmp_path / "digits-png"
    assert main(["data", "convert", "digits", str(data), "--format", "images"]) == 0
    assert sorted(p.name for p in data.iterdir()) == [str(c) for c in range(10)]
    assert sum(1 for _ in data.rglob("*.png")) == 1797
    job = yaml.safe_load((JOBS / "cnn_digits.yaml").read_text())
    job["data"] = {**job["data"], "name": "images", "path": str(data)}
    job["data"].pop("options")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    address = ray_session.get_runtime_context().gcs_address
    rc = main(["train", str(tmp_path / "job.yaml"), f"trainer.max_epochs={EPOCHS}", f"runs_dir={tmp_path}",
               "name=images", "logging.wandb.enabled=false", "logging.progress=false", "--address", address])
    out = capfd.readouterr()
    assert rc == 0, out.err[-3000:]
    summary = json.loads((tmp_path / "images" / "summary.json").read_text())
    print(f"digits as PNG images, CNN, {EPOCHS} epochs: test acc {summary['test']['test/acc']:.4f}")
    assert summary["world_size"] == 2
    assert summary["test"]["test/acc"] >= 0.93, summary["test"]


def test_digits_as_npz_shards_of_images_stream_to_2_workers_training_the_cnn(ray_session, tmp_path, capfd):
    data = tmp_path / "digits-npz"
    assert main(["data", "convert", str(JOBS / "cnn_digits.yaml"), str(data), "--format", "npz",
                 "--rows-per-file", "400"]) == 0
    with np.load(data / "part-00000.npz") as shard:
        assert shard["x"].shape == (400, 1, 8, 8) and shard["y"].shape == (400,)
    address = ray_session.get_runtime_context().gcs_address
    rc = main(["train", str(JOBS / "cnn_digits.yaml"), "data.name=npz", "data.stream=true", f"data.path={data}",
               "data.options={}", f"trainer.max_epochs={EPOCHS}", f"runs_dir={tmp_path}", "name=npz",
               "logging.wandb.enabled=false", "logging.progress=false", "--address", address])
    out = capfd.readouterr()
    assert rc == 0, out.err[-3000:]
    summary = json.loads((tmp_path / "npz" / "summary.json").read_text())
    print(f"digits as .npz shards of 8x8 images, CNN, {EPOCHS} epochs: test acc {summary['test']['test/acc']:.4f}")
    assert summary["world_size"] == 2
    assert summary["test"]["test/acc"] >= 0.93, summary["test"]


def test_csv_files_are_counted_typed_and_classed_by_ray_datas_pass(ray_session, tmp_path):
    rng = np.random.default_rng(0)
    tables = [pa.table({"a": rng.normal(size=n), "b": np.arange(n) if i else rng.normal(size=n),
                        "label": rng.integers(0, 4, n) + (i == 1)}) for i, n in enumerate([300, 250, 101])]
    for i, table in enumerate(tables):
        pacsv.write_csv(table, tmp_path / f"part-{i}.csv")
    source = describe(DataConfig(name="csv", stream=True, path=str(tmp_path)))
    datasets, info = prepare(source, standardize=True)
    rows = {c: np.concatenate([t[c].to_numpy().astype(np.float64) for t in tables]) for c in ("a", "b")}
    rows["label"] = np.concatenate([t["label"].to_numpy() for t in tables])
    split = split_of(rows, ["a", "b", "label"], 0, 0.1, 0.2)
    assert info.counts == {name: int((split == i).sum()) for i, name in enumerate(["train", "val", "test"])}
    assert info.meta.num_classes == 5  # labels 0..4: the second file's reach 4
    batch = next(iter(datasets["train"].iter_batches(batch_size=10_000, batch_format="numpy")))
    assert batch["x"].shape == (info.counts["train"], 2) and batch["x"].dtype == np.float32
    np.testing.assert_allclose(batch["x"].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(batch["y"], rows["label"][split == 0])


def test_an_image_of_another_size_found_while_streaming_is_one_data_error(ray_session, tmp_path):
    """Beyond the headers the driver reads (or added after it read them): Ray Data's counting pass finds it."""
    for i, name in enumerate(["a/0.png", "b/1.png"]):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (6, 4), color=i).save(tmp_path / name)
    source = describe_images(DataConfig(name="images", path=str(tmp_path)))
    Image.new("L", (6, 5)).save(tmp_path / "b" / "1.png")
    with pytest.raises(DataError, match=r"data.path: reading .* failed: data.path: an image of shape \(5, 6\)"):
        prepare(source, standardize=True)
