"""The vertical slice through Ray Train: job spec -> `dtrain train` -> TorchTrainer -> 2 DDP workers -> run dir."""

import json
import subprocess
import sys

from dtrain.tracking import read_metrics
from tests.helpers import JOBS, ROOT


def test_cli_trains_the_make_train_job_to_097_on_a_running_cluster(ray_session, tmp_path):
    # The `make train` job through the real command line; `--address` joins this session's cluster (the
    # embedded-Ray CLI path is the Ctrl-C test's).
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.run(
        [sys.executable, "-m", "dtrain", "train", str(JOBS / "mlp_digits.yaml"), f"runs_dir={tmp_path}", "name=cli",
         "logging.wandb.enabled=false", "--address", address],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "test/acc" in proc.stdout
    run = tmp_path / "cli"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["test"]["test/acc"] >= 0.97
    assert (run / "config.yaml").is_file()
    assert list(run.glob("checkpoint_*/model.pt")), "Ray Train kept no checkpoint"
    events = read_metrics(run)
    epochs = [e for e in events if e["event"] == "epoch"]
    assert epochs and all("val/acc" in e for e in epochs)
    assert any(e["event"] == "step" and "train/grad_norm" in e and "lr" in e for e in events)
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
