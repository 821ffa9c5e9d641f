"""Bad streamed input (data.name parquet, images, csv and npz with data.stream=true) and `dtrain data`: each one
`dtrain: error:` line naming the file, key or URI, exit 2, found on the driver from the files' metadata before Ray
starts (run through dtrain.cli.main in this process, as tests/unit/test_bad_input.py does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dtrain.cli import main
from tests.unit.test_bad_input import _argv, _assert_one_clear_line

PQ = "train JOB data.name=parquet"
CSV = "train JOB data.name=csv data.stream=true"
NPZ = "train JOB data.name=npz data.stream=true"


def _table(n: int = 40, **extra) -> pa.Table:
    rng = np.random.default_rng(0)
    cols = {"a": rng.normal(size=n).astype(np.float32), "b": rng.normal(size=n).astype(np.float32),
            "label": (np.arange(n) % 2).astype(np.int64)}
    return pa.table({**cols, **extra})


def _write_files(d: Path) -> None:
    (d / "empty").mkdir()
    for name, second in {"othercols": _table().rename_columns(["a", "c", "label"]),
                         "otherdtype": _table().set_column(2, "label", pa.array(np.zeros(40), pa.float64())),
                         "good": _table()}.items():
        (d / name).mkdir()
        pq.write_table(_table(), d / name / "part-0.parquet")
        pq.write_table(second, d / name / "part-1.parquet")
    (d / "corrupt").mkdir()
    pq.write_table(_table(), d / "corrupt" / "part-0.parquet")
    (d / "corrupt" / "part-1.parquet").write_bytes(b"PAR1 this is not really a parquet file")
    pq.write_table(_table(words=pa.array(["w"] * 40)), d / "words.parquet")
    pq.write_table(_table().drop_columns(["b"]), d / "val_without_b.parquet")
    pq.write_table(pa.table({"a": pa.array([], pa.float32()), "label": pa.array([], pa.int64())}), d / "none.parquet")
    (d / "notempty").mkdir()
    (d / "notempty" / "x").write_text("x")
    _write_csv_files(d / "csv")
    _write_npz_files(d / "npz")
    _write_image_folders(d / "img")


def _write_image_folders(d: Path) -> None:
    """ImageFolder layouts: a good one, and one bad one per case."""
    folders = {"good": ["a/0.png", "b/1.png"], "loose": ["a/0.png", "1.png"], "oneclass": ["a/0.png"],
               "mixed": ["a/0.png", "b/1.png", "b/2.png"], "corrupt": ["a/0.png", "b/1.png"],
               "other": ["a/0.png", "c/1.png"]}
    for name, files in folders.items():
        for i, rel in enumerate(files):
            (d / name / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.new("L", (6, 4 + (name == "mixed" and i == 2))).save(d / name / rel)
    (d / "corrupt" / "b" / "1.png").write_bytes(b"not a png")


def _write_csv_files(d: Path) -> None:
    """CSV files with a header row: a good folder (an integer feature column in one file, a float one in the
    other: read as float), and one bad file or folder per case."""
    for name, second in {"good": _table().set_column(0, "a", pa.array(np.arange(40))),
                         "othercols": _table().rename_columns(["a", "c", "label"]),
                         "words": _table().set_column(1, "b", pa.array(["w"] * 40)),
                         "emptyfile": None, "headeronly": _table().slice(0, 0)}.items():
        (d / name).mkdir(parents=True)
        pacsv.write_csv(_table(), d / name / "part-0.csv")
        if second is None:
            (d / name / "part-1.csv").write_bytes(b"")
        else:
            pacsv.write_csv(second, d / name / "part-1.csv")
    pacsv.write_csv(_table(words=pa.array(["w"] * 40)), d / "words.csv")
    pacsv.write_csv(_table().drop_columns(["b"]), d / "val_without_b.csv")
    pacsv.write_csv(_table().set_column(2, "label", pa.array(np.full(40, 0.5))), d / "val_float.csv")


def _write_npz_files(d: Path) -> None:
    """.npz files of arrays x (rows, 2, 3) and y: a good folder, and one bad file or folder per case."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 2, 3)).astype(np.float32), np.arange(40) % 2
    for name, second in {"good": {"x": x, "y": y}, "otherarrays": {"x": x, "z": y},
                         "othershape": {"x": x.reshape(40, 6), "y": y},
                         "otherdtype": {"x": x.astype(np.float64), "y": y}, "corrupt": None}.items():
        (d / name).mkdir(parents=True)
        np.savez(d / name / "part-0.npz", x=x, y=y)
        if second is None:
            (d / name / "part-1.npz").write_bytes(b"PK not really a zip archive")
        else:
            np.savez(d / name / "part-1.npz", **second)
    np.savez(d / "rows.npz", x=x, y=y[:30])
    np.savez(d / "words.npz", x=x, y=y, w=np.array(["w"] * 40, dtype=object))
    np.save(d / "plain.npy", x)
    np.savez(d / "val_other_shape.npz", x=x[:, :, :2], y=y)
    np.savez(d / "tensor_target.npz", x=x, y=x)


# (id, command line after `dtrain` ({d} = the scratch folder), what the one error line must contain)
CASES = [
    ("missing-path", PQ + " data.path={d}/nope", "data.path: {d}/nope not found"),
    ("glob-matches-nothing", PQ + " data.path={d}/*.nope", "data.path: {d}/*.nope matches no file"),
    ("empty-folder", PQ + " data.path={d}/empty", "data.path: {d}/empty holds no .parquet file"),
    ("no-path", PQ, "data.path: required for data set 'parquet'"),
    ("shard-with-other-columns", PQ + " data.path={d}/othercols",
     "data.path: {d}/othercols/part-1.parquet: its columns (a: float, c: float, label: int64) differ from"),
    ("shard-with-other-dtypes", PQ + " data.path={d}/otherdtype",
     "data.path: {d}/otherdtype/part-1.parquet: its columns (a: float, b: float, label: double) differ"),
    ("corrupt-file", PQ + " data.path={d}/corrupt", "data.path: {d}/corrupt/part-1.parquet: not a readable Parquet"),
    ("target-names-no-column", PQ + " data.path={d}/good data.target=klass",
     "data.target: no column 'klass' in {d}/good (columns: a, b, label)"),
    ("feature-names-no-column", PQ + " data.path={d}/good data.features=[a,zz]",
     "data.features: no column 'zz' in {d}/good"),
    ("non-numeric-feature", PQ + " data.path={d}/words.parquet", "data.features: column 'words' of"),
    ("no-rows", PQ + " data.path={d}/none.parquet data.features=[a]", "data.path: {d}/none.parquet holds no rows"),
    ("val-files-without-a-column", PQ + " data.path={d}/good data.val_path={d}/val_without_b.parquet",
     "{d}/val_without_b.parquet: no column 'b' (the training files have it)"),
    ("missing-val-path", PQ + " data.path={d}/good data.test_path={d}/nope", "data.test_path: {d}/nope not found"),
    ("whole-set-descent", PQ + " data.path={d}/good optim.descent=batch", "optim.descent: batch"),
    ("fourier-on-a-stream", PQ + " data.path={d}/good data.fourier=true", "data.fourier: not supported"),
    ("unreachable-object-storage", PQ + " data.path=s3://dtrain-test/d?endpoint_override=127.0.0.1:9&scheme=http",
     "data.path: cannot read s3://dtrain-test/d?endpoint_override=127.0.0.1:9&scheme=http: the storage endpoint "
     "cannot be reached"),
    ("missing-bucket", PQ + " data.path=s3://dtrain-no-such-bucket/d", "data.path: s3://dtrain-no-such-bucket/d"),
    ("tune-searches-a-missing-column", "tune {tune} data.name=parquet data.path={d}/good "
     "tune.space.data.target=choice([label,klass])", "tune.space.data.target: 'klass' does not fit the job: "
     "data.target: no column 'klass' in {d}/good"),
    ("preflight-does-not-stream", "preflight JOB data.name=parquet data.path={d}/good",
     "dtrain preflight does not stream"),
    ("csv-missing-path", CSV + " data.path={d}/csv/nope", "data.path: {d}/csv/nope not found"),
    ("csv-empty-folder", CSV + " data.path={d}/empty", "data.path: {d}/empty holds no .csv file"),
    ("csv-file-with-other-columns", CSV + " data.path={d}/csv/othercols",
     "data.path: {d}/csv/othercols/part-1.csv: its columns (a: double, c: double, label: int64) differ from"),
    ("csv-column-that-turns-to-words", CSV + " data.path={d}/csv/words",
     "data.path: {d}/csv/words/part-1.csv: column 'b' is string, {d}/csv/words/part-0.csv's is double"),
    ("csv-empty-file", CSV + " data.path={d}/csv/emptyfile",
     "data.path: {d}/csv/emptyfile/part-1.csv: not a readable CSV file (Empty CSV file)"),
    ("csv-header-only", CSV + " data.path={d}/csv/headeronly",
     "data.path: {d}/csv/headeronly/part-1.csv: not a readable CSV file (no rows, a header only)"),
    ("csv-non-numeric-column", CSV + " data.path={d}/csv/words.csv", "data.features: column 'words' of"),
    ("csv-target-names-no-column", CSV + " data.path={d}/csv/good data.target=klass",
     "data.target: no column 'klass' in {d}/csv/good (columns: a, b, label)"),
    ("csv-val-files-without-a-column", CSV + " data.path={d}/csv/good data.val_path={d}/csv/val_without_b.csv",
     "{d}/csv/val_without_b.csv: no column 'b' (the training files have it)"),
    ("csv-val-files-with-a-float-target", CSV + " data.path={d}/csv/good data.val_path={d}/csv/val_float.csv",
     "{d}/csv/val_float.csv: column 'label' is double, the training files' is int64"),
    ("csv-folder-without-stream", "train JOB data.name=csv data.path={d}/csv/good",
     "data.path: {d}/csv/good is not one local file; set data.stream=true"),
    ("csv-glob-without-stream", "train JOB data.name=csv data.path={d}/csv/good/*.csv",
     "data.path: {d}/csv/good/*.csv is not one local file; set data.stream=true"),
    ("stream-an-in-memory-set", "train JOB data.name=digits data.stream=true",
     "data.stream: expected false or null for data.name=digits (only parquet, images, csv and npz stream)"),
    ("npz-missing-path", NPZ + " data.path={d}/npz/nope", "data.path: {d}/npz/nope not found"),
    ("npz-empty-folder", NPZ + " data.path={d}/empty", "data.path: {d}/empty holds no .npz file"),
    ("npz-file-with-other-arrays", NPZ + " data.path={d}/npz/otherarrays",
     "data.path: {d}/npz/otherarrays/part-1.npz: its columns (x: extension<arrow.fixed_shape_tensor"),
    ("npz-file-with-other-shapes", NPZ + " data.path={d}/npz/othershape",
     "data.path: {d}/npz/othershape/part-1.npz: its columns (x: extension<arrow.fixed_shape_tensor[value_type=float, "
     "shape=[6]]>, y: int64) differ from"),
    ("npz-file-with-other-dtypes", NPZ + " data.path={d}/npz/otherdtype",
     "data.path: {d}/npz/otherdtype/part-1.npz: its columns (x: extension<arrow.fixed_shape_tensor[value_type=double"),
    ("npz-corrupt-file", NPZ + " data.path={d}/npz/corrupt",
     "data.path: {d}/npz/corrupt/part-1.npz: not a readable .npz file (File is not a zip file)"),
    ("npz-arrays-of-other-lengths", NPZ + " data.path={d}/npz/rows.npz",
     "data.path: {d}/npz/rows.npz: not a readable .npz file (its arrays differ in rows (x: 40, y: 30))"),
    ("npz-array-of-objects", NPZ + " data.path={d}/npz/words.npz",
     "data.path: {d}/npz/words.npz: not a readable .npz file (array 'w' holds object values, expected numbers)"),
    ("npz-a-plain-npy-file", NPZ + " data.path={d}/npz/plain.npy",
     "data.path: {d}/npz/plain.npy: not a readable .npz file (File is not a zip file)"),
    ("npz-target-names-no-array", NPZ + " data.path={d}/npz/good data.target=label2",
     "data.target: no column 'label2' in {d}/npz/good (columns: x, y)"),
    ("npz-tensor-target", NPZ + " data.path={d}/npz/tensor_target.npz data.features=[x]",
     "data.target: 'y' of {d}/npz/tensor_target.npz holds (2, 3) values per row, expected one number"),
    ("npz-val-with-another-shape", NPZ + " data.path={d}/npz/good data.val_path={d}/npz/val_other_shape.npz",
     "{d}/npz/val_other_shape.npz: column 'x' is extension<arrow.fixed_shape_tensor[value_type=float, shape=[2,2]]>"),
    ("npz-folder-without-stream", "train JOB data.name=npz data.path={d}/npz/good",
     "data.path: {d}/npz/good is not one local file; set data.stream=true to stream npz files"),
    ("inspect-npz-corrupt", "data inspect {d}/npz/corrupt --format npz",
     "PATH: {d}/npz/corrupt/part-1.npz: not a readable .npz file"),
    ("convert-to-csv", "data convert iris {d}/out4 --format csv", "data convert: --format parquet, npz or images"),
    ("parquet-without-stream", PQ + " data.path={d}/good data.stream=false",
     "data.stream: expected true or null for data.name=parquet (it only streams)"),
    ("tune-does-not-stream-csv", "tune {tune} data.name=csv data.stream=true data.path={d}/csv/good",
     "data.name: csv streams through Ray Data in `dtrain train` (and parquet in `dtrain tune`) only"),
    ("images-a-file", "train JOB data.name=images data.path={d}/img/good/a/0.png",
     "data.path: {d}/img/good/a/0.png: expected a folder (or URI) with one subfolder of images per class"),
    ("images-outside-a-class-folder", "train JOB data.name=images data.path={d}/img/loose",
     "data.path: {d}/img/loose/1.png: not in a class subfolder (expected {d}/img/loose/<class>/<image>)"),
    ("images-of-one-class", "train JOB data.name=images data.path={d}/img/oneclass",
     "data.path: {d}/img/oneclass has 1 class subfolder (a); expected one subfolder per class, at least 2"),
    ("images-of-another-size", "train JOB data.name=images data.path={d}/img/mixed",
     "data.path: {d}/img/mixed/b/2.png is 5x6 (H x W), {d}/img/mixed/a/0.png is 4x6; set data.options.size"),
    ("images-corrupt", "train JOB data.name=images data.path={d}/img/corrupt",
     "data.path: {d}/img/corrupt/b/1.png: not a readable image"),
    ("images-bad-size", "train JOB data.name=images data.path={d}/img/good data.options.size=8",
     "data.options.size: expected [height, width] (two integers >= 1), got 8"),
    ("images-bad-mode", "train JOB data.name=images data.path={d}/img/good data.options.mode=CMYK",
     "data.options.mode: expected L (gray) or RGB, got 'CMYK'"),
    ("images-unknown-option", "train JOB data.name=images data.path={d}/img/good data.options.image=true",
     "data.options.image: unknown option for 'images' (allowed: size, mode)"),
    ("images-stream-false", "train JOB data.name=images data.path={d}/img/good data.stream=false",
     "data.stream: expected true or null for data.name=images (it only streams)"),
    ("images-val-with-an-unknown-class", "train JOB data.name=images data.path={d}/img/good "
     "data.val_path={d}/img/other", "data.val_path: class folder 'c' of {d}/img/other is not one of"),
    ("convert-not-images", "data convert wine {d}/out3 --format images",
     "data.name: wine has samples of shape (13,), not images"),
    ("inspect-missing", "data inspect {d}/nope", "PATH: {d}/nope not found"),
    ("inspect-corrupt", "data inspect {d}/corrupt", "PATH: {d}/corrupt/part-1.parquet: not a readable Parquet"),
    ("convert-into-a-full-folder", "data convert iris {d}/notempty", "{d}/notempty: not empty"),
    ("convert-unknown-set", "data convert cifar {d}/out", "data.name"),
    ("convert-parquet", "data convert parquet {d}/out2", "data.name: parquet is streamed from its files already"),
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream_bad_input")
    _write_files(d)
    return d


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_parquet_input_is_one_clear_line_and_exit_2(case, scratch, capfd, monkeypatch, request):
    name = case[0]
    if "bucket" in name:
        request.getfixturevalue("s3")  # the moto server the AWS_ENDPOINT_URL of tests/conftest.py points at
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rc = main(_argv(case, scratch))
    _assert_one_clear_line(case, rc, capfd.readouterr().err, scratch)
