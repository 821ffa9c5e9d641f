"""`dtrain up` keeps a Ray head between runs; `dtrain train` without --address uses it; `dtrain down` stops it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from tests.helpers import JOBS, ROOT
from tests.ray.test_train import LOOPBACK, _listening


def _dtrain(*args, env):
    return subprocess.run([sys.executable, "-m", "dtrain", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env=env)


def test_up_train_down(tmp_path):
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

        run = _dtrain("train", JOBS / "mlp_digits.yaml", f"runs_dir={tmp_path}", "name=warm", "trainer.max_epochs=1",
                      "logging.wandb.enabled=false", "logging.progress=false", env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        assert f"using the local Ray head at {address}" in run.stdout
        assert (tmp_path / "warm" / "summary.json").is_file()
        assert head.is_running()  # the run left the head up for the next one

        listening = _listening(head)
        assert {"gcs_server", "raylet"} <= set(listening), listening
        outside = {name: addrs for name, addrs in listening.items() if {ip for ip, _ in addrs} - LOOPBACK}
        assert not outside, f"the head listens beyond loopback: {outside}"
        session = [head, *head.children(recursive=True)]

        down = _dtrain("down", env=env)
        assert down.returncode == 0 and "stopped" in down.stdout
        gone, alive = psutil.wait_procs(session, timeout=30)
        assert not alive, alive  # the head and everything it started
        assert "no local Ray head was running" in _dtrain("down", env=env).stdout
    finally:
        _dtrain("down", env=env)
