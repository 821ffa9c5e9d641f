"""data.name=parquet end to end through the real command line (in this process, on the session's Ray): digits
written as unequal Parquet files by `dtrain data convert`, streamed by Ray Data to 2 DDP workers, to the
accuracy bar of the in-memory `make train` job (tests/ray/test_train.py), every rank taking the steps the driver
counted; and the same job SIGTERMed mid-epoch (every rank checkpoints at the next step boundary, Ray Train restarts
the group), which continues on the stream at the next untrained sample and ends bitwise equal to the uninterrupted
run."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray.data
import torch

from dtrain.cli import main
from dtrain.config import load_job, to_objects
from dtrain.data.stream_source import describe
from dtrain.engine.checkpoint import read_manifest, safe_load
from dtrain.launch.stream import task_resources
from dtrain.launch.train import fit_job
from dtrain.tracking import read_metrics
from tests.faults import SignalAt
from tests.helpers import JOBS, parquet_train_rows

EPOCHS = 6  # the fewest at which the streamed run reaches the in-memory bar
COMMON = [f"trainer.max_epochs={EPOCHS}", "logging.wandb.enabled=false", "logging.progress=false"]


@pytest.fixture(scope="module")
def stream(ray_session, tmp_path_factory):
    """The Parquet files and the uninterrupted 6-epoch run on them (runs/stream)."""
    tmp = tmp_path_factory.mktemp("stream")
    data = tmp / "digits"
    assert main(["data", "convert", "digits", str(data), "--rows-per-file", "700"]) == 0
    address = ray_session.get_runtime_context().gcs_address
    rc = main(["train", str(JOBS / "mlp_digits.yaml"), "data.name=parquet", f"data.path={data}", *COMMON,
               f"runs_dir={tmp / 'runs'}", "name=stream", "--address", address])
    assert rc == 0
    return {"data": data, "runs": tmp / "runs", "run": tmp / "runs" / "stream"}


def _steps_per_epoch(data) -> int:
    """The training rows of the seeded split, shared equally by the 2 ranks, in steps of 2 x 32 samples."""
    return math.ceil((parquet_train_rows(data) // 2) / 32)


def test_digits_as_unequal_parquet_files_stream_to_2_workers_at_the_in_memory_bar(stream):
    files = sorted(stream["data"].glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [700, 700, 397]  # unequal shards
    summary = json.loads((stream["run"] / "summary.json").read_text())
    assert summary["world_size"] == 2
    print(f"parquet digits, {EPOCHS} epochs: test acc {summary['test']['test/acc']:.4f}")
    assert summary["test"]["test/acc"] >= 0.97, summary["test"]
    steps = _steps_per_epoch(stream["data"])
    events = read_metrics(stream["run"])
    assert [e["steps_per_epoch"] for e in events if e["event"] == "stage"] == [steps]
    assert [e["step"] for e in events if e["event"] == "epoch"] == [steps * k for k in range(1, EPOCHS + 1)]
    assert summary["steps"] == EPOCHS * steps


def _final_checkpoint(run_dir):
    return max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: read_manifest(p)["step"])


def _trajectory(events) -> tuple[list, list]:
    """(step, train loss) of every logged step; (step, val metrics) of every epoch."""
    steps = [(e["step"], e["train/loss"]) for e in events if e["event"] == "step"]
    epochs = [(e["step"], {k: v for k, v in e.items() if k.startswith("val/")}) for e in events
              if e["event"] == "epoch"]
    return steps, epochs


def test_a_run_sigtermed_mid_epoch_continues_on_the_stream_bitwise_equal(stream, tmp_path):
    """Rank 1 SIGTERMed mid-epoch 3: every rank checkpoints at the next step boundary, Ray Train restarts the group
    (trainer.max_failures=1), which reads the epoch's stream again, streams past the steps already trained and
    trains on: no step redone or skipped, the same losses at every logged step, the same final weights."""
    steps = _steps_per_epoch(stream["data"])
    at = 2 * steps + steps // 2
    job = load_job(JOBS / "mlp_digits.yaml", ["data.name=parquet", f"data.path={stream['data']}", *COMMON,
                                              f"runs_dir={stream['runs']}", "name=sigterm", "trainer.max_failures=1"])
    summary = fit_job(job, data=describe(to_objects(job).data),
                      worker_callbacks=[SignalAt(1, at, tmp_path / "signalled")])
    assert (tmp_path / "signalled").exists()  # rank 1 really was SIGTERMed
    run = stream["runs"] / "sigterm"
    events = read_metrics(run)
    (preempted,) = [e for e in events if e["event"] == "preempted"]
    (resumed,) = [e for e in events if e["event"] == "resume"]
    assert at < preempted["step"] < 3 * steps  # the next step boundary every rank agreed on, mid-epoch 3
    assert (resumed["step"], resumed["samples"]) == (preempted["step"], preempted["samples"])
    assert resumed["epoch_samples"] == (preempted["step"] - 2 * steps) * 64  # continued mid-epoch, not at its start
    assert summary["steps"] == EPOCHS * steps and summary["stop_reason"] == "completed"
    # the uninterrupted run's trajectory, step for step (a step redone or skipped shifts every later loss)
    assert _trajectory(events) == _trajectory(read_metrics(stream["run"]))
    a, b = safe_load(_final_checkpoint(run) / "model.pt"), safe_load(_final_checkpoint(stream["run"]) / "model.pt")
    assert read_manifest(_final_checkpoint(run))["step"] == EPOCHS * steps
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for idx, state in b["optimizer"]["state"].items():
        for key in state:
            assert torch.equal(a["optimizer"]["state"][idx][key], state[key]), (idx, key)


def _span(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    start = time.time()
    time.sleep(0.2)
    return {"start": np.full(len(batch["id"]), start), "end": np.full(len(batch["id"]), time.time())}


def test_ray_data_tasks_that_ask_for_no_cpu_run_at_most_one_per_cpu(ray_session):
    # When the training workers hold every CPU, Ray Data's tasks ask for none; uncapped, Ray would run all of them
    # at once, each in a new worker process, and starve the training workers. (Which processes run them varies:
    # Ray replaces idle workers; what is capped is how many run at once.)
    tasks = task_resources(spare_cpus=0, cluster_cpus=2)
    ds = ray.data.range(32, override_num_blocks=16).map_batches(_span, batch_format="numpy", **tasks)
    spans = {(row["start"], row["end"]) for row in ds.take_all()}
    assert len(spans) == 16
    running = max(sum(start <= t < end for start, end in spans) for t, _ in spans)
    assert running <= 2, sorted(spans)


def test_a_read_is_cut_into_few_large_blocks_not_ray_datas_200(ray_session, tmp_path):
    """Each block is a Ray Data task and a round of its scheduling, CPU the training workers lose where they hold
    every core: dtrain's reads are cut into blocks of at least MIN_BLOCK_BYTES (Ray Data's own floor is 1 MiB, which
    cuts a 50 MiB file into 50 blocks). Ray still makes at least 2 blocks per CPU."""
    from dtrain.launch.stream import MIN_BLOCK_BYTES, set_data_context

    rows = 200_000  # 64 float32 features: about 50 MiB in memory
    x = np.random.default_rng(0).standard_normal((rows, 64), dtype=np.float32)
    pq.write_table(pa.table({f"f{i}": x[:, i] for i in range(64)}), tmp_path / "part.parquet")
    set_data_context()
    blocks = ray.data.read_parquet(str(tmp_path)).materialize().num_blocks()
    cpus = int(ray.cluster_resources()["CPU"])
    assert blocks <= max(2 * cpus, math.ceil(x.nbytes / MIN_BLOCK_BYTES)), blocks
