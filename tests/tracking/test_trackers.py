"""TensorBoard and MLflow beside metrics.jsonl, read back from the real things: a 2-rank run logs to an MLflow
tracking server (started by the tests, SQLite backend) and to TensorBoard event files; values equal
metrics.jsonl, resuming continues the same MLflow run, and the tracking token lands in no file or log."""

from __future__ import annotations

import json

import pytest

from dtrain.tracking import MLFLOW_ID_FILE, SUMMARY_FILE, Tracker, read_metrics
from dtrain.tracking.base import numbers, summary_values
from tests.helpers import small_job
from tests.tracking.readback import (
    assert_same,
    assert_summary,
    expected_values,
    mlflow_values,
    tensorboard_values,
)

FAKE_TOKEN = "dtrain-test-fake-mlflow-token-93e1a7"


def test_tensorboard_sink_matches_metrics_jsonl(tmp_path):
    job = small_job(**{"logging.tensorboard.enabled": "true"})
    with Tracker(tmp_path, job, echo=False) as tracker:
        tracker.log({"event": "step", "step": 5, "epoch": 0.5, "lr": 0.1, "train/loss": 1.5, "samples_per_s": 3e4})
        tracker.log({"event": "epoch", "stage": "main", "epoch": 1, "step": 10, "train/loss": 1.25, "val/acc": 0.5})
        tracker.log({"event": "end", "steps": 10, "test": {"test/acc": 0.75}, "best": {"val/acc": 0.5},
                     "stop_reason": "completed", "wall_time_s": 2.0})
    scalars, texts = tensorboard_values(tmp_path / "tensorboard")
    assert_same(scalars, expected_values(tmp_path), 1e-6, "tensorboard")
    assert scalars["train/loss_epoch"] == {10: 1.25} and scalars["train/loss"] == {5: 1.5}
    assert_summary(scalars, read_metrics(tmp_path)[-1], 1e-6, "tensorboard")
    assert {"config/text_summary", "summary/text_summary"} <= texts


@pytest.mark.slow
def test_mlflow_and_tensorboard_match_metrics_and_resume_continues(mlflow_server, tmp_path, monkeypatch, capfd):
    from mlflow.tracking import MlflowClient

    from dtrain.launch.spawn import spawn_workers

    uri, server_root = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", FAKE_TOKEN)
    run_dir = tmp_path / "run"
    over = {"logging.mlflow.enabled": "true", "logging.mlflow.tracking_uri": uri, "logging.mlflow.experiment": "t1",
            "logging.mlflow.log_checkpoint": "true", "logging.mlflow.tags": "{team: vision}",
            "logging.tensorboard.enabled": "true", "trainer.log_every_n_steps": 4, "trainer.max_epochs": 1}
    spawn_workers(small_job(**over), run_dir, world=2)

    client = MlflowClient(uri)
    run_id = (run_dir / MLFLOW_ID_FILE).read_text().strip()
    runs = client.search_runs([client.get_experiment_by_name("t1").experiment_id])
    assert [r.info.run_id for r in runs] == [run_id], "one MLflow run per job (rank 0 only)"
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t"
    assert run.data.params["model.name"] == "mlp" and run.data.params["trainer.log_every_n_steps"] == "4"
    assert json.loads(run.data.params["model.hidden"]) == [32]
    end = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert run.data.tags["team"] == "vision" and run.data.tags["dtrain.stop_reason"] == end["stop_reason"]
    want = expected_values(run_dir)
    assert len(want["train/loss"]) >= 3 and "val/acc" in want
    got = mlflow_values(client, run_id, [*want, *numbers(summary_values(end))])
    assert_same(got, want, 1e-12, "mlflow")
    assert_summary(got, end, 1e-12, "mlflow")
    artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
    assert {"checkpoint/model.pt", "checkpoint/train_state.pt"} <= artifacts, artifacts
    assert run.data.tags["dtrain.checkpoint_step"] == str(end["steps"])
    scalars, _ = tensorboard_values(run_dir / "tensorboard")
    assert_same(scalars, want, 1e-6, "tensorboard")

    # Resume with one more epoch: the same MLflow run continues the step axis; TensorBoard appends.
    spawn_workers(small_job(**over | {"trainer.max_epochs": 2}), run_dir, world=2, resume=True)
    assert (run_dir / MLFLOW_ID_FILE).read_text().strip() == run_id
    assert len(client.search_runs([run.info.experiment_id])) == 1
    want = expected_values(run_dir)
    got = mlflow_values(client, run_id, want)
    assert_same(got, want, 1e-12, "mlflow after resume")
    assert len(got["val/acc"]) == 2 and client.get_run(run_id).info.status == "FINISHED"
    assert_same(tensorboard_values(run_dir / "tensorboard")[0], want, 1e-6, "tensorboard after resume")

    out = capfd.readouterr()
    assert f"MLflow run {run_id} (continued)" in out.out
    files = [p for root in (tmp_path, server_root) for p in root.rglob("*") if p.is_file()]
    leaks = [p for p in files if FAKE_TOKEN.encode() in p.read_bytes()]
    assert not leaks and FAKE_TOKEN not in out.out + out.err, leaks
