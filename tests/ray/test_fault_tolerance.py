"""Ray-level reliability: Ctrl-C on `dtrain train` leaves no workers and a usable checkpoint; `--resume` continues
it; a worker SIGKILLed mid-epoch is restarted from the latest checkpoint (trainer.max_failures); a user error raised
inside a Ray worker reaches the command line as one line and exit status 2."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from dtrain.cli import main
from dtrain.config import load_job
from dtrain.engine.checkpoint import checkpoint_problem, pick_checkpoint, read_manifest, safe_load
from dtrain.launch.spawn import spawn_workers
from dtrain.launch.train import fit_job
from dtrain.tracking import read_metrics
from tests.faults import KillAt
from tests.helpers import JOBS, ROOT

pytestmark = pytest.mark.slow

OVERRIDES = ["trainer.max_epochs=40", "checkpoint.every_n_steps=7", "checkpoint.keep=3", "logging.progress=false",
             "logging.wandb.enabled=false", "trainer.early_stopping.monitor=null", "model.hidden=[32]"]


def _intact_checkpoints(run_dir):
    return sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir() and checkpoint_problem(p) is None)


def _wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A real `dtrain train --ray` (its own embedded Ray) interrupted with SIGINT after two checkpoints."""
    runs = tmp_path_factory.mktemp("runs")
    cmd = [sys.executable, "-m", "dtrain", "train", str(JOBS / "mlp_digits.yaml"), "name=ctrl-c",
           f"runs_dir={runs}", *OVERRIDES, "--ray"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    # Own session, like a terminal's foreground job: Ctrl-C signals the whole process group.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    run_dir = runs / "ctrl-c"
    try:
        _wait_for(lambda: len(_intact_checkpoints(run_dir)) >= 2 or proc.poll() is not None, 300, "2 checkpoints")
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert any("RayTrainWorker" in " ".join(_cmdline(p)) for p in tree), "no Ray Train workers found"
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    return {"run_dir": run_dir, "rc": proc.returncode, "out": out, "alive": alive, "tree": tree}


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def test_ctrl_c_stops_workers_and_leaves_a_usable_checkpoint(interrupted):
    assert interrupted["rc"] == 130, interrupted["out"][-3000:]
    assert "dtrain: interrupted" in interrupted["out"]
    assert interrupted["alive"] == [], [(p.pid, _cmdline(p)) for p in interrupted["alive"]]
    run_dir = interrupted["run_dir"]
    # What a resume picks: the newest folder whose manifest checks out (an upload cut off by the interrupt is not).
    last = pick_checkpoint(sorted(run_dir.glob("checkpoint_*"), reverse=True))
    assert last is not None and read_manifest(last)["step"] >= 14
    weights = safe_load(last / "model.pt")["model"]
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_resume_after_ctrl_c_survives_a_killed_worker(interrupted, tmp_path, ray_session):
    run_dir = interrupted["run_dir"]
    start = read_manifest(_intact_checkpoints(run_dir)[-1])
    # As the second checkpoint after it is taken (every 7 steps): the first is published by then (at most one write
    # is in flight). Rank 1 lives 2 s on, in which the writer threads may write and report the second too.
    kill_step = start["step"] + 14
    job = load_job(run_dir / "config.yaml", [f"trainer.max_epochs={start['epoch'] + 2}", "trainer.max_failures=1"])
    reference = tmp_path / "reference"  # the same resume with no kill, run without Ray below
    shutil.copytree(run_dir, reference)
    # what `dtrain train --resume RUN_DIR` does, on this session's Ray, with rank 1 SIGKILLed once at kill_step
    summary = fit_job(job, resume=True, worker_callbacks=[KillAt(1, kill_step, tmp_path / "killed", delay_s=2)])
    assert (tmp_path / "killed").exists()  # rank 1 really was SIGKILLed once
    resumes = [r for r in read_metrics(run_dir) if r.get("event") == "resume"]
    assert len(resumes) == 2
    assert resumes[0]["step"] == start["step"]  # --resume continued from the newest intact checkpoint
    assert resumes[0]["step"] < resumes[1]["step"] <= kill_step  # the restart began at a later checkpoint
    assert summary["stop_reason"] == "completed" and summary["epochs"] == start["epoch"] + 2
    # The kill and the restart lost no math: bitwise the same test figures as the resume that was not interrupted.
    assert summary["test"] == spawn_workers(job, reference, world=2, resume=True)["test"]


def test_user_error_inside_a_ray_worker_is_one_line_and_exit_2(tmp_path, capsys, ray_session):
    # lr=1e30 makes every step non-finite: the TrainingError is raised inside the Ray workers, not on the driver.
    rc = main(["train", str(JOBS / "mlp_digits.yaml"), "name=nan", f"runs_dir={tmp_path}", "optim.lr=1e30",
               "optim.scheduler=none", "trainer.grad_clip=null", "trainer.max_nonfinite_steps=3",
               "logging.wandb.enabled=false", "logging.progress=false"])
    time.sleep(2)  # Ray streams the workers' log lines to this console a moment after they are written
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert rc == 2
    errors = [line for line in err if "dtrain: error:" in line]
    assert len(errors) == 1, err[-10:]  # Ray's own log lines may come before or after it
    assert errors[0].startswith("dtrain: error: training stopped: 3 consecutive steps had a non-finite"), err[-5:]
    assert "Traceback" not in out.err + out.out  # the workers do not print the user's mistake as a traceback
