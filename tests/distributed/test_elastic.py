"""World-size-independent training: with data.global_batch_size set, a run that goes 2 -> 1 -> 2 workers through
checkpoints (a rank SIGKILLed each time, then resumed at the other world size) follows the trajectory of a run that
kept 2 workers, up to floating-point reduction order."""

from __future__ import annotations

import pytest
from torch.multiprocessing import ProcessExitedException

from dtrain.engine.checkpoint import read_manifest, safe_load
from dtrain.errors import Preempted
from dtrain.launch.spawn import latest_checkpoint, spawn_workers
from dtrain.tracking import read_metrics
from tests.faults import KillAt, SignalAt
from tests.helpers import small_job

# 1294 training samples / 32 per step = 41 steps in the epoch (the last one 14 samples). Micro-batches of at most 8:
# 2 workers accumulate 2 micro-batches of 8 per step, 1 worker 4. Adam, a cosine schedule with warm-up and
# per-epoch shuffling: state a resume must carry over; no dropout (its masks are drawn per rank).
JOB = small_job(**{"data.global_batch_size": 32, "data.batch_size": 8, "optim.scheduler": "cosine",
                   "optim.warmup_steps": 5, "trainer.max_epochs": 1, "checkpoint.every_n_steps": 8,
                   "trainer.log_every_n_steps": 8})
TOLERANCE = 1e-6
"""Largest absolute difference of any weight allowed after 41 steps (docs/elastic.md gives the measured one)."""


def _segment(job, run_dir, world, kill_step, marker, resume):
    with pytest.raises(ProcessExitedException):
        spawn_workers(job, run_dir, world=world, resume=resume, callbacks=[KillAt(world - 1, kill_step, marker)])
    assert marker.exists()


def _weights(run_dir):
    return safe_load(run_dir / "model.pt")  # the final weights, gathered whatever the strategy


@pytest.mark.parametrize(("strategy", "worlds"), [("ddp", (2, 1, 2)), ("fsdp", (2, 1))])
def test_changing_worker_counts_follow_the_unchanged_trajectory(tmp_path, strategy, worlds):
    """DDP 2 -> 1 -> 2 workers, FSDP 2 -> 1 (its checkpoints are resharded by torch.distributed.checkpoint)."""
    job = {**JOB, "trainer": {**JOB["trainer"], "strategy": strategy}}
    full = spawn_workers(job, tmp_path / "full", world=2)
    # Each kill comes as a checkpoint is taken (steps 16 and 32), so the one before it (8, 24) is the newest
    # published: at most one write is in flight, and a write is published at a later step boundary.
    run, kills = tmp_path / "elastic", (16, 32)
    for i, world in enumerate(worlds[:-1]):
        _segment(job, run, world, kills[i], tmp_path / f"kill{i}", resume=i > 0)
    summary = spawn_workers(job, run, world=worlds[-1], resume=True)
    resumes = [(r["step"], r["epoch_samples"]) for r in read_metrics(run) if r.get("event") == "resume"]
    assert resumes == [(8, 8 * 32), (24, 24 * 32)][:len(worlds) - 1]
    assert [r["global_batch"] for r in read_metrics(run) if r.get("event") == "stage"] == [32] * len(worlds)
    assert summary["steps"] == full["steps"] == 41
    a, b = _weights(tmp_path / "full"), _weights(run)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"{strategy}: max abs weight difference after {' -> '.join(map(str, worlds))} workers: {diff:.3g}")
    assert diff <= TOLERANCE
    assert abs(summary["test"]["test/loss"] - full["test"]["test/loss"]) < 1e-5



def test_sigterm_checkpoints_at_the_next_step_boundary_and_loses_no_sample(tmp_path):
    """SIGTERM to rank 1 after step 13: every rank learns it from the vote started at step 13's boundary, reads it
    at step 14's, checkpoints step 14 there and stops; the resumed run goes on from step 14: no step redone."""
    run = tmp_path / "preempted"
    with pytest.raises(Preempted, match="training stopped at step 14: a worker was asked to stop"):
        spawn_workers(JOB, run, world=2, callbacks=[SignalAt(1, 13, tmp_path / "sigterm")], graceful_sigterm=True)
    assert read_manifest(latest_checkpoint(run))["step"] == 14  # the scheduled ones were at 8 (and 16, not reached)
    summary = spawn_workers(JOB, run, world=2, resume=True)
    (preempted,) = [r for r in read_metrics(run) if r.get("event") == "preempted"]
    (resume,) = [r for r in read_metrics(run) if r.get("event") == "resume"]
    assert preempted["step"] == resume["step"] == 14 and preempted["samples"] == resume["samples"] == 14 * 32
    n_train = 1294
    trained = preempted["samples"] + (n_train - resume["samples"])  # each segment's own samples
    assert trained == n_train and summary["steps"] == 41  # every sample once: none lost, none trained twice
