"""data.name=parquet end to end through the real command line (in this process, on the session's Ray): digits
written as unequal Parquet files by `dtrain data convert`, streamed by Ray Data to 2 DDP workers, to the
accuracy bar of the in-memory `make train` job (tests/ray/test_train.py), every rank taking the steps the driver
counted."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pyarrow.parquet as pq
import ray.data

from dtrain.cli import main
from dtrain.data.parquet import split_of
from dtrain.launch.stream import task_resources
from dtrain.tracking import read_metrics
from tests.helpers import JOBS

EPOCHS = 6  # the fewest at which the streamed run reaches the in-memory bar


def test_digits_as_unequal_parquet_files_stream_to_2_workers_at_the_in_memory_bar(ray_session, tmp_path, capfd):
    data = tmp_path / "digits"
    assert main(["data", "convert", "digits", str(data), "--rows-per-file", "700"]) == 0
    files = sorted(data.glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [700, 700, 397]  # unequal shards
    address = ray_session.get_runtime_context().gcs_address
    # the 2 workers hold every CPU of the 4: Ray Data's tasks ask for none (a small machine's case)
    rc = main(["train", str(JOBS / "mlp_digits.yaml"), "data.name=parquet", f"data.path={data}",
               f"trainer.max_epochs={EPOCHS}", "trainer.cpus_per_worker=2", f"runs_dir={tmp_path}",
               "name=stream", "logging.wandb.enabled=false", "logging.progress=false", "--address", address])
    out = capfd.readouterr()
    assert rc == 0, out.err[-3000:]
    summary = json.loads((tmp_path / "stream" / "summary.json").read_text())
    assert summary["world_size"] == 2
    print(f"parquet digits, {EPOCHS} epochs: test acc {summary['test']['test/acc']:.4f}")
    assert summary["test"]["test/acc"] >= 0.97, summary["test"]
    # the training rows of the seeded split, shared equally by the 2 ranks, in steps of 2 x 32 samples
    table = pq.read_table(data).to_pydict()
    cols = [f"f{j}" for j in range(64)] + ["label"]
    n_train = int((split_of({c: np.asarray(table[c]) for c in cols}, cols, 0, 0.1, 0.2) == 0).sum())
    steps = math.ceil((n_train // 2) / 32)
    events = read_metrics(tmp_path / "stream")
    assert [e["steps_per_epoch"] for e in events if e["event"] == "stage"] == [steps]
    assert [e["step"] for e in events if e["event"] == "epoch"] == [steps * k for k in range(1, EPOCHS + 1)]
    assert summary["steps"] == EPOCHS * steps


def _pid(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    time.sleep(0.2)
    return {"pid": np.full(len(batch["id"]), os.getpid())}


def test_ray_data_tasks_that_ask_for_no_cpu_run_at_most_one_per_cpu(ray_session):
    # When the training workers hold every CPU, Ray Data's tasks ask for none; uncapped, Ray would run all of them
    # at once, each in a new worker process, and starve the training workers.
    tasks = task_resources(spare_cpus=0, cluster_cpus=2)
    ds = ray.data.range(32, override_num_blocks=16).map_batches(_pid, batch_format="numpy", **tasks)
    assert len({row["pid"] for row in ds.take_all()}) <= 2
