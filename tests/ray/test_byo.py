"""The user project in examples/user_project through the real command line on Ray: `dtrain train` of a plain
nn.Module with the user's own loss and data loader (the workers import the user's package), its report, and a
2-trial `dtrain tune` over the module's constructor arguments."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dtrain.cli import main
from dtrain.launch.tune import BEST_FILE, RESULTS_FILE
from dtrain.tracking import read_metrics
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

PROJECT = ROOT / "examples/user_project"


def test_cli_trains_the_users_module_loss_and_data_from_another_folder(ray_session, tmp_path):
    # Run from an unrelated folder: the job file's project (its pyproject.toml) is what makes mynets importable.
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-m", "dtrain", "train", str(PROJECT / "jobs/smallnet_spirals.yaml"), f"runs_dir={tmp_path}",
         "name=spirals", "logging.wandb.enabled=false", "logging.progress=false", "--address", address],
        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "spirals"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["test"]["test/acc"] > 0.9  # a linear model gets ~0.6
    epochs = [e for e in read_metrics(run) if e["event"] == "epoch"]
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    assert list(run.glob("checkpoint_*/model.pt")), "Ray Train kept no checkpoint"
    report = (run / "report" / "report.md").read_text()  # `dtrain train` ends with `dtrain report`
    assert "mynets.nets:SmallNet" in report and "test/acc" in report
    assert (run / "report" / "metrics.png").is_file()


def test_cli_tunes_the_modules_constructor_args(ray_session, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc = main(["tune", str(PROJECT / "jobs/tune_smallnet.yaml"), f"runs_dir={tmp_path}", "name=widths",
               "trainer.max_epochs=1", "logging.wandb.enabled=false"])
    assert rc == 0, capsys.readouterr().err[-3000:]
    rows = (tmp_path / "widths" / RESULTS_FILE).read_text().splitlines()
    assert len(rows) == 3, rows  # header + one row per trial
    trained = {}
    for run_dir in (tmp_path / "widths" / "trials").glob("*/run0"):
        width = OmegaConf.load(run_dir / "config.yaml").model.args.width
        trained[width] = json.loads((run_dir / "summary.json").read_text())["test"]["test/acc"]
    assert set(trained) == {4, 128}, trained
    assert trained[128] > trained[4]  # the searched argument reached the network: 4 hidden units underfit
    assert OmegaConf.load(tmp_path / "widths" / BEST_FILE).model.args.width == 128
