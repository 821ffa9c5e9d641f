"""The vertical slice through Ray Train: job spec -> TorchTrainer -> 2 DDP workers -> run directory."""

import json
import subprocess
import sys

from dtrain.config import load_job
from dtrain.launch.train import fit_job
from dtrain.tracking import read_metrics
from tests.helpers import JOBS, ROOT


def test_make_train_job_reaches_097_on_digits(ray_session, tmp_path):
    job = load_job(JOBS / "mlp_digits.yaml", [f"runs_dir={tmp_path}", "name=digits", "logging.progress=false"])
    summary = fit_job(job)
    assert summary["world_size"] == 2
    assert summary["test"]["test/acc"] >= 0.97
    run = tmp_path / "digits"
    assert (run / "config.yaml").is_file() and (run / "summary.json").is_file()
    assert list(run.glob("checkpoint_*/model.pt")), "Ray Train kept no checkpoint"
    events = read_metrics(run)
    epochs = [e for e in events if e["event"] == "epoch"]
    assert epochs and all("val/acc" in e for e in epochs)
    assert any(e["event"] == "step" and "train/grad_norm" in e and "lr" in e for e in events)
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]


def test_cli_train_on_a_running_cluster_writes_run_directory(ray_session, tmp_path):
    # `dtrain train --address` joins this session's cluster (the embedded-Ray CLI path is the Ctrl-C test's).
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-m", "dtrain", "train", str(JOBS / "mlp_digits.yaml"), "trainer.max_epochs=1",
         f"runs_dir={tmp_path}", "name=cli", "logging.wandb.enabled=false", "--address", address],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test/acc" in proc.stdout
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["world_size"] == 2
    assert 0.5 < summary["test"]["test/acc"] <= 1.0
