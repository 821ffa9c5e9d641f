"""`dtrain up` keeps a Ray head between runs; `dtrain train` without --address uses it (the `make train` job, listening
on loopback only, with the same figures as the engine alone gives, which tests/quality/test_catalog.py holds to the
job's accuracy bar); `dtrain down` stops it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from dtrain.config import load_job
from dtrain.launch.spawn import spawn_workers
from dtrain.tracking import read_metrics
from tests.helpers import JOBS, ROOT
from tests.ray.test_train import _listening, assert_loopback_only, beyond_loopback, sockets_listened_on

OVERRIDES = ["trainer.max_epochs=3", "logging.wandb.enabled=false", "cost.per_cpu_hour=0.5"]


def _dtrain(*args, env):
    return subprocess.run([sys.executable, "-m", "dtrain", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


def test_up_then_the_make_train_job_on_the_head_then_down(tmp_path):
    state = Path(tempfile.mkdtemp(prefix="dth-", dir="/tmp"))  # short: Ray puts unix sockets under it
    env = {**os.environ, "DTRAIN_LOCAL_HEAD_DIR": str(state)}
    try:
        up = _dtrain("up", "--num-cpus", 2, env=env)
        assert up.returncode == 0, up.stderr[-2000:]
        head = psutil.Process(int((state / "head.pid").read_text()))
        address = (state / "address").read_text().strip()
        assert address.startswith("127.0.0.1:") and f"started at {address}" in up.stdout
        again = _dtrain("up", env=env)  # idempotent: the same head
        assert f"already running at {address}" in again.stdout

        # The `make train` job through the real command line, on the head (its workers are the head's processes).
        with sockets_listened_on(head) as seen:
            run = _dtrain("train", JOBS / "mlp_digits.yaml", *OVERRIDES, f"runs_dir={tmp_path}", "name=cli", env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"using the local Ray head at {address}" in run.stdout and "test/acc" in run.stdout
        assert_loopback_only(seen)
        _assert_trained(tmp_path / "cli")
        assert head.is_running()  # the run left the head up for the next one

        listening = _listening(head)
        assert {"gcs_server", "raylet"} <= set(listening), listening
        assert not beyond_loopback(listening), f"the head listens beyond loopback: {beyond_loopback(listening)}"
        session = [head, *head.children(recursive=True)]

        stopping = time.monotonic()
        down = _dtrain("down", env=env)
        assert down.returncode == 0 and "stopped" in down.stdout
        gone, alive = psutil.wait_procs(session, timeout=30)
        assert time.monotonic() - stopping < 15  # no drain deadline waited out (Ray's default is 30 s)
        assert not alive, alive  # the head and everything it started
        assert "no local Ray head was running" in _dtrain("down", env=env).stdout
    finally:
        _dtrain("down", env=env)


def _assert_trained(run) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 3
    # Bitwise the engine's own result for the job (2 local processes, no Ray).
    engine = spawn_workers(load_job(JOBS / "mlp_digits.yaml", OVERRIDES), run.parent / "engine", world=2)
    assert summary["test"] == engine["test"]
    cost = summary["cost"]  # the worker group's measured lifetime x 2 workers x 1 CPU, priced
    assert cost["segments"] == 1 and cost["gpu_hours"] == 0 and cost["cpu_hours"] * 3600 >= 2 * summary["wall_time_s"]
    assert cost["cost"] == pytest.approx(0.5 * cost["cpu_hours"])
    assert (run / "config.yaml").is_file()
    assert list(run.glob("checkpoint_*/model.pt")), "Ray Train kept no checkpoint"
    events = read_metrics(run)
    epochs = [e for e in events if e["event"] == "epoch"]
    assert epochs and all("val/acc" in e for e in epochs)
    assert any(e["event"] == "step" and "train/grad_norm" in e and "lr" in e for e in events)
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
