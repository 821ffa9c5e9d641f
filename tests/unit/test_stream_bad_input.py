"""Bad Parquet input for data.name=parquet and `dtrain data`: each one `dtrain: error:` line naming the file, key or
URI, exit 2, found on the driver from the files' metadata before Ray starts (run through dtrain.cli.main in this
process, as tests/unit/test_bad_input.py does)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dtrain.cli import main
from tests.unit.test_bad_input import _argv, _assert_one_clear_line

PQ = "train JOB data.name=parquet"


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
    ("inspect-missing", "data inspect {d}/nope", "PATH: {d}/nope not found"),
    ("inspect-corrupt", "data inspect {d}/corrupt", "PATH: {d}/corrupt/part-1.parquet: not a readable Parquet"),
    ("convert-into-a-full-folder", "data convert iris {d}/notempty", "{d}/notempty: not empty"),
    ("convert-unknown-set", "data convert cifar {d}/out", "data.name"),
    ("convert-parquet", "data convert parquet {d}/out2", "data.name: parquet is Parquet already"),
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
