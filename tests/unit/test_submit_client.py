"""dtrain.launch.submit without a cluster: token lookup, address, staging of code + spec, the entrypoint."""

from __future__ import annotations

import shlex

import pytest

from dtrain.errors import DtrainError
from dtrain.launch import submit
from tests.helpers import JOBS, ROOT


@pytest.fixture
def no_ray_env(monkeypatch, tmp_path):
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_token_sources_in_rays_order(no_ray_env, monkeypatch):
    home = no_ray_env
    assert submit.find_token() == (None, "nowhere")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("from-home\n")
    assert submit.find_token() == ("from-home", str(home / ".ray" / "auth_token"))
    other = home / "tok"
    other.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert submit.find_token() == ("from-path", str(other))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert submit.find_token() == ("from-env", "RAY_AUTH_TOKEN")


def test_missing_token_path_is_a_clear_error(no_ray_env, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(no_ray_env / "missing"))
    with pytest.raises(DtrainError, match=r"RAY_AUTH_TOKEN_PATH: .*missing does not exist"):
        submit.find_token()


def test_cluster_address(no_ray_env, monkeypatch):
    assert submit.cluster_address(None) == "http://127.0.0.1:8265"
    assert submit.cluster_address("10.0.0.5:8265/") == "http://10.0.0.5:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # a GCS address is not the Jobs API: ignored
    assert submit.cluster_address(None) == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert submit.cluster_address(None) == "http://head:8265"
    assert submit.cluster_address("https://other:443") == "https://other:443"


def test_stage_code_ships_package_and_spec_but_not_venv_or_runs(tmp_path):
    spec = tmp_path / "elsewhere.yaml"
    spec.write_text("model: {name: mlp}\n")
    workdir = tmp_path / "stage"
    rel = submit.stage_code(spec, workdir)
    assert rel == f"{submit.SPEC_DIR}/elsewhere.yaml"
    assert (workdir / rel).read_text() == spec.read_text()
    assert (workdir / "dtrain" / "launch" / "submit.py").is_file() and (workdir / "pyproject.toml").is_file()
    assert not any((workdir / name).exists() for name in (".venv", "runs", ".git", "wandb"))
    assert not list(workdir.rglob("__pycache__"))
    # A spec inside the project travels with the code and keeps its relative path.
    assert submit.stage_code(JOBS / "mlp_digits.yaml", tmp_path / "stage2") == "jobs/mlp_digits.yaml"
    assert submit.code_root() == ROOT


def test_entrypoint_quotes_overrides_and_names_the_job_once():
    cmd = submit.entrypoint_for("train", "jobs/a b.yaml", ["model.hidden=[64, 32]", "name=run 1"], "run 1")
    assert shlex.split(cmd) == ["python", "-m", "dtrain", "train", "jobs/a b.yaml", "model.hidden=[64, 32]",
                                "name=run 1", "--address", "auto"]


def test_jobs_subcommand_needs_an_id(capsys):
    from dtrain.cli import main

    assert main(["jobs", "stop"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "dtrain: error: jobs stop: expected a submission id (see `dtrain jobs list`)"


def test_tune_specs_run_dtrain_tune():
    from dtrain.config import load_job

    assert submit.default_command(load_job(JOBS / "tune_mlp_digits.yaml")) == "tune"
    assert submit.default_command(load_job(JOBS / "mlp_digits.yaml")) == "train"


def test_stage_code_ships_the_job_files_own_project_with_dtrain_beside_it(tmp_path):
    project = ROOT / "examples/user_project"
    rel = submit.stage_code(project / "jobs/resnet_digits.yaml", tmp_path / "stage")
    assert rel == "jobs/resnet_digits.yaml"
    staged = tmp_path / "stage"
    assert (staged / "mynets" / "resnet.py").is_file() and (staged / "dtrain" / "launch" / "submit.py").is_file()
    assert 'name = "mynets"' in (staged / "pyproject.toml").read_text()  # the user's project is the working dir
    assert not (staged / "tests").exists() and not (staged / "jobs" / "mlp_digits.yaml").exists()  # not dtrain
