"""The trackers through Ray Tune and Train: `dtrain tune` makes one MLflow run per trial, nested under one parent
run per search, and one TensorBoard folder per trial."""

from __future__ import annotations

import pytest

from dtrain.config import load_job
from dtrain.launch.tune import run_search
from tests.helpers import small_job
from tests.tracking.readback import assert_same, expected_values, mlflow_values


@pytest.mark.slow
def test_tune_nests_one_mlflow_run_per_trial_under_the_search(ray_session, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    uri, _ = mlflow_server
    base = small_job(**{"runs_dir": str(tmp_path), "name": "search", "trainer.num_workers": 1, "model.hidden": "[8]",
                        "trainer.max_epochs": 1, "logging.progress": "false", "logging.mlflow.enabled": "true",
                        "logging.mlflow.tracking_uri": uri, "logging.mlflow.experiment": "tune",
                        "logging.tensorboard.enabled": "true", "logging.tensorboard.dir": str(tmp_path / "tb")})
    base["tune"] = {"metric": "val/acc", "mode": "max", "search_alg": "grid", "max_concurrent_trials": 1,
                    "space": {"optim.lr": "choice([0.02, 0.01])"}}
    rows, _ = run_search(load_job(None, base=base))
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
