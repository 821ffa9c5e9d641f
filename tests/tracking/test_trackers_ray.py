"""The trackers through Ray Tune and Train: `dtrain tune` makes one MLflow run per trial, nested under one parent
run per search, and one TensorBoard folder per trial. The search is also the suite's search-algorithm check (optuna
drawing list-valued choices) and its streaming check (data.name=parquet: two trials at once, whose drivers and
workers hold every CPU of the session's Ray, each streaming its own batch size), so that its trials are not run
twice."""

from __future__ import annotations

import math

import pytest

from dtrain.cli import main
from dtrain.config import load_job
from dtrain.launch.tune import BEST_FILE, run_search
from dtrain.tracking import read_metrics
from tests.helpers import parquet_train_rows, small_job
from tests.tracking.readback import assert_same, expected_values, mlflow_values


@pytest.mark.slow
def test_tune_nests_one_mlflow_run_per_trial_under_the_search(ray_session, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, _ = mlflow_server
    data = tmp_path / "digits"
    assert main(["data", "convert", "digits", str(data)]) == 0
    base = small_job(**{"runs_dir": str(tmp_path), "name": "search", "trainer.num_workers": 1, "model.hidden": "[8]",
                        "trainer.max_epochs": 1, "logging.progress": "false", "logging.mlflow.enabled": "true",
                        "logging.mlflow.tracking_uri": uri, "logging.mlflow.experiment": "tune",
                        "logging.tensorboard.enabled": "true", "logging.tensorboard.dir": str(tmp_path / "tb"),
                        "data.name": "parquet", "data.path": str(data)})
    base["tune"] = {"metric": "val/acc", "mode": "max", "search_alg": "optuna", "num_samples": 2,
                    # 2 trials x 1 worker leave 2 of the session's 4 CPUs to the streams' reads (the reads that
                    # share the workers' CPUs: tests/ray/test_stream.py, and stream_tasks in tests/ray/test_tune.py)
                    "max_concurrent_trials": 2, "trial_cpus": 0,
                    "space": {"optim.lr": "loguniform(1e-3, 3e-2)", "model.hidden": "choice([[8], [16, 8]])",
                              "data.batch_size": "choice([32, 64])"}}
    rows, _ = run_search(load_job(None, base=base))
    # the search algorithm's two draws, each a full trial, the best one written as a train spec
    assert len(rows) == 2 and all(r["status"] == "ok" and r["epochs"] == 1 for r in rows), rows
    assert all(r["model.hidden"] in ([8], [16, 8]) and 1e-3 <= r["optim.lr"] <= 3e-2 for r in rows)
    assert rows[0]["optim.lr"] != rows[1]["optim.lr"]  # two samples drawn by the algorithm, not one repeated
    assert all(r["test/acc"] > 0.1 for r in rows)  # each trial ran to its test split
    parquet_rows = parquet_train_rows(data)
    for row in rows:  # each trial streamed the Parquet rows of the seeded split, in steps of its own batch size
        stage = [e for e in read_metrics(row["run_dir"]) if e["event"] == "stage"]
        assert [e["steps_per_epoch"] for e in stage] == [math.ceil(parquet_rows / row["data.batch_size"])]
    best = load_job(tmp_path / "search" / BEST_FILE)
    assert list(best.model.hidden) == rows[0]["model.hidden"] and best.optim.lr == pytest.approx(rows[0]["optim.lr"])
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tune").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["search"] and parents[0].info.status == "FINISHED"
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert sorted(trials) == sorted(r["trial"] for r in rows) and len(runs) == 3
    for row in rows:
        trial = trials[row["trial"]]
        assert float(trial.data.params["optim.lr"]) == row["optim.lr"]
        assert trial.data.tags["dtrain.key"] == f"search/{row['trial']}"
        want = expected_values(row["run_dir"])
        assert_same(mlflow_values(client, trial.info.run_id, want), want, 1e-12, row["trial"])
        assert (tmp_path / "tb" / "search" / row["trial"]).is_dir(), "TensorBoard: one folder per trial"
