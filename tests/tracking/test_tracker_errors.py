"""Bad tracker settings from the command line: one `dtrain: error:` line and exit 2 before Ray starts (no run dir
is written); with enabled=auto an MLflow server that does not answer is one warning line and the run goes on."""

from __future__ import annotations

import pytest

from dtrain.cli import check_trackers, main
from dtrain.config import load_job
from dtrain.launch.net import free_port
from dtrain.tracking import Tracker, read_metrics
from tests.helpers import JOBS, small_job


def _train(tmp_path, capsys, *over: str) -> tuple[int, list[str]]:
    code = main(["train", str(JOBS / "mlp_digits.yaml"), f"runs_dir={tmp_path}", "name=bad", *over])
    return code, capsys.readouterr().err.strip().splitlines()


def test_unanswered_tracking_uri_is_one_line_before_ray(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    code, err = _train(tmp_path, capsys, "logging.mlflow.enabled=true", f"logging.mlflow.tracking_uri={uri}")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"dtrain: error: logging.mlflow.tracking_uri: no MLflow tracking server answers at {uri}")
    assert not (tmp_path / "bad").exists(), "the run dir is written only after the checks (and Ray)"


def test_unwritable_tensorboard_dir_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")  # a folder below a file cannot be created, even by root
    code, err = _train(tmp_path, capsys, "logging.tensorboard.enabled=true", f"logging.tensorboard.dir={tmp_path}/file")
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"dtrain: error: logging.tensorboard.dir: cannot write event files in {tmp_path}/file/bad")
    assert not (tmp_path / "bad").exists()


def test_password_in_tracking_uri_is_refused_and_not_echoed(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, "logging.mlflow.tracking_uri=https://me:s3cret-pw@mlflow.example:443")
    assert code == 2 and len(err) == 1 and "s3cret-pw" not in err[0], err
    assert "logging.mlflow.tracking_uri: expected a URI without a password" in err[0]


def test_auto_with_unanswered_server_warns_once_and_goes_on(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    job = load_job(None, base=small_job(**{"logging.mlflow.tracking_uri": uri, "logging.mlflow.enabled": "auto"}))
    check_trackers(job)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("[dtrain] warning: logging.mlflow.tracking_uri: no MLflow"), out
    assert job.logging.mlflow.enabled == "false", "switched off for this run: workers do not try again"
    # and a worker's tracker, told auto, logs to metrics.jsonl with one line about MLflow
    with Tracker(tmp_path, small_job(**{"logging.mlflow.tracking_uri": uri}), echo=False) as tracker:
        tracker.log({"event": "step", "step": 1, "lr": 0.1})
    assert read_metrics(tmp_path)[0]["lr"] == 0.1
    assert capsys.readouterr().out.count("MLflow is off for this run") == 1


def test_true_without_a_uri_is_a_config_error(monkeypatch):
    from dtrain.errors import ConfigError
    from dtrain.tracking import preflight

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="logging.mlflow.tracking_uri: required when logging.mlflow.enabled"):
        preflight(small_job(**{"logging.mlflow.enabled": "true"}))
    assert preflight(small_job()) == {}, "auto without a URI: MLflow is simply off"


def test_tracking_uri_from_the_environment_travels_with_the_job(monkeypatch, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    job = load_job(None, base=small_job())
    check_trackers(job)  # auto: on, because of the variable; nothing answers, so off for this run
    assert job.logging.mlflow.tracking_uri == uri and job.logging.mlflow.enabled == "false"
    assert "no MLflow tracking server answers" in capsys.readouterr().out
