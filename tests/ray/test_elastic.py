"""Elastic training through Ray and the real command line: a worker that freezes (SIGSTOP) ends its run's collective
after trainer.collective_timeout_s with one line naming the step and the rank, and Ray restarts the run from its
checkpoint. (A worker asked to stop, SIGTERM, checkpoints at the next step boundary and Ray restarts the group:
tests/ray/test_stream.py, bitwise, and tests/distributed/test_elastic.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dtrain.tracking import METRICS_FILE, read_metrics
from tests.helpers import JOBS, ROOT

pytestmark = pytest.mark.slow

COMMON = ["logging.wandb.enabled=false", "logging.progress=false", "trainer.early_stopping.monitor=null",
          "model.hidden=[32]", "model.dropout=0", "data.global_batch_size=64"]


EPOCHS = 40


def _start(ray_session, run_dir, *overrides):
    address = ray_session.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "dtrain", "train", str(JOBS / "mlp_digits.yaml"), f"runs_dir={run_dir.parent}",
           f"name={run_dir.name}", *COMMON, *overrides, "--address", address]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _workers(run_dir) -> dict[int, psutil.Process]:
    """The run's two Ray Train worker processes by rank: rank 0 holds the run's metrics.jsonl open, rank 1 is the
    other RayTrainWorker process of the same raylet."""
    metrics = str(run_dir / METRICS_FILE)
    for proc in psutil.process_iter():
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) and any(f.path == metrics for f in proc.open_files()):
                others = [p for p in proc.parent().children() if p.pid != proc.pid
                          and "RayTrainWorker" in " ".join(p.cmdline())]
                return {0: proc, 1: others[0]} if len(others) == 1 else {}
        except psutil.Error:
            continue
    return {}


def _events(run_dir, kind):
    return [e for e in read_metrics(run_dir) if e.get("event") == kind]


def test_a_frozen_worker_times_out_with_one_line_and_ray_restarts_the_run(ray_session, tmp_path):
    """Rank 1 SIGSTOPped: the collective times out, one line names the step and the rank, Ray restarts the group
    (an elastic range: as many workers as fit, 2 here) from the checkpoint, and the run ends with every step."""
    run_dir, timeout = tmp_path / "frozen", 8
    # 40 epochs (about 10 s of steps on 2 cores): training is still going when the slow process scan below has
    # found the workers, so the signal lands mid-training
    proc = _start(ray_session, run_dir, f"trainer.max_epochs={EPOCHS}", "trainer.num_workers=[1,2]",
                  f"trainer.collective_timeout_s={timeout}", "trainer.max_failures=1", "checkpoint.every_n_steps=10")
    try:
        workers = _wait_for(lambda: _events(run_dir, "epoch") and _workers(run_dir), 120, "the first epoch")
        workers[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        (hang,) = _wait_for(lambda: _events(run_dir, "hang"), timeout + 60, "the collective's timeout")
        noticed = time.monotonic() - stopped
        (resume,) = _wait_for(lambda: _events(run_dir, "resume"), 120, "the restart")
        restarted = time.monotonic() - stopped
        out, err = proc.communicate(timeout=240)
    except AssertionError as failed:  # what the run did and printed, for a failure seen once in a while
        proc.kill()
        events = [e.get("event") for e in read_metrics(run_dir) if e.get("event") not in (None, "epoch")]
        raise AssertionError(f"{failed}; events {events}; stderr:\n{proc.communicate()[1][-4000:]}") from failed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    print(f"SIGSTOP -> timeout noticed {noticed:.1f} s, -> training resumed {restarted:.1f} s")
    assert f"after step {hang['step']} did not complete within {timeout} s on rank 0: rank 1 did not arrive" in (
        hang["message"]) and hang["absent_ranks"] == [1]
    assert noticed < timeout + 20  # the timeout, the roll call at the store (3 s), and a loaded machine's delays
    assert 0 < resume["step"] <= hang["step"]  # from a checkpoint taken before the hang
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == EPOCHS * 21 and summary["world_size"] == 2
