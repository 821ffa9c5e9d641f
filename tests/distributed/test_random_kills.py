"""Kills from outside at random moments: the driver or one worker of a 2-process run is SIGKILLed 20 times (half of
the kills while a checkpoint is being written), each time restarted with resume; every restart continues from an
intact checkpoint (or falls back to the previous one with one warning line) and none crashes by itself; the final
weights equal an uninterrupted run's, bitwise."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time

import psutil
import pytest
import torch

from dtrain.engine.checkpoint import checkpoint_problem, safe_load
from dtrain.launch.spawn import latest_checkpoint, spawn_workers
from dtrain.tracking import read_metrics
from tests import kill_target
from tests.helpers import small_job

pytestmark = pytest.mark.slow

KILLS = 20
# 1294 samples / (16 x 2) = 41 steps an epoch, a checkpoint every 2 steps (so that kills land in writes too), long
# enough that no restart finishes before it is killed (on a fast machine one of 12 epochs did).
JOB = small_job(**{"model.dropout": 0.1, "data.batch_size": 16, "optim.scheduler": "cosine", "trainer.max_epochs": 24,
                   "checkpoint.every_n_steps": 2, "trainer.log_every_n_steps": 4})


def _steps_logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"event": "step"') if path.exists() else 0


def _start(job_file, run_dir, log) -> mp.Process:
    """The run to kill, forked from the fork server that spawn_workers started in this process (its start-up then
    costs no imports: what is killed is training, not Python starting)."""
    proc = mp.get_context("forkserver").Process(target=kill_target.run, args=(str(job_file), str(run_dir), str(log)))
    proc.start()
    return proc


def _kill(proc: mp.Process, rng: random.Random, run_dir, in_write: bool) -> str:
    """Once the restarted run has logged a random number of steps, SIGKILL its driver (and so its workers) or one
    worker, at once or while a checkpoint is being written (a .partial_* folder exists). Returns what was killed."""
    target = _steps_logged(run_dir) + rng.randint(1, 5)
    while _steps_logged(run_dir) < target and proc.is_alive():
        time.sleep(0.005)
    deadline = time.monotonic() + (1.0 if in_write else rng.uniform(0.0, 0.2))
    while time.monotonic() < deadline and proc.is_alive():
        if in_write and any((run_dir / "checkpoints").glob(".partial_*")):
            break
        time.sleep(0.001)
    if not proc.is_alive():
        return "finished"
    workers = psutil.Process(proc.pid).children()  # the ranks, forked from the driver
    if workers and rng.random() < 0.5:
        victim = rng.choice(workers)
        victim.kill()
        what = "worker"
    else:
        what = "driver"
    os.killpg(proc.pid, signal.SIGKILL)  # a worker's death ends the run; the rest of the group goes with it
    proc.join()
    return what


def test_twenty_random_kills_then_resume_end_bitwise_equal(tmp_path):
    full = spawn_workers(JOB, tmp_path / "full", world=2)
    job_file, run_dir, log = tmp_path / "job.json", tmp_path / "killed", tmp_path / "output.log"
    job_file.write_text(json.dumps(JOB))
    rng, outcomes, in_writes, fallbacks = random.Random(17), [], 0, 0
    for i in range(KILLS):
        proc = _start(job_file, run_dir, log)
        outcomes.append(_kill(proc, rng, run_dir, in_write=i % 2 == 1))
        in_writes += any((run_dir / "checkpoints").glob(".partial_*"))  # it died with a checkpoint half merged
        err = log.read_text()
        fallbacks += err.count("resuming from the previous checkpoint")
        assert "Traceback" not in err or "SIGKILL" in err or "exit code" in err, err[-2000:]
    final = _start(job_file, run_dir, log)
    final.join(timeout=600)
    final_err = log.read_text()
    assert final.exitcode == 0, final_err[-3000:]
    resumes = [e for e in read_metrics(run_dir) if e["event"] == "resume"]
    print(f"\nkilled: {outcomes.count('driver')} drivers, {outcomes.count('worker')} workers, "
          f"{outcomes.count('finished')} runs had already finished, {in_writes} during a checkpoint's merge; "
          f"{len(resumes)} resumes; "
          f"fallbacks to a previous checkpoint: {fallbacks + final_err.count('resuming from the previous')}")
    assert outcomes.count("finished") == 0 and len(resumes) >= KILLS // 2  # every kill interrupted training
    assert all(checkpoint_problem(p) is None for p in (run_dir / "checkpoints").glob("step_*"))
    # nothing the killed ranks were writing (dtrain-ckpt-<pid>-*: staged here) or merging (.partial_*) is left behind
    assert all(p.name.startswith("step_") for p in (run_dir / "checkpoints").iterdir())
    summary = json.loads((run_dir / "summary_final.json").read_text())
    assert summary["steps"] == full["steps"] and summary["test"] == full["test"]
    mine = safe_load(latest_checkpoint(run_dir) / "model.pt")
    theirs = safe_load(latest_checkpoint(tmp_path / "full") / "model.pt")
    assert all(torch.equal(mine["model"][k], theirs["model"][k]) for k in theirs["model"])
    for idx, state in theirs["optimizer"]["state"].items():
        assert all(torch.equal(state[k], mine["optimizer"]["state"][idx][k]) for k in state)
