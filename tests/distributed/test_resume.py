"""Exact resume: a rank really SIGKILLed mid-epoch, then resumed, ends bitwise equal to an uninterrupted run."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch.multiprocessing import ProcessExitedException

from dtrain.engine.checkpoint import (
    CheckpointError,
    atomic_save,
    checkpoint_problem,
    pick_checkpoint,
    read_manifest,
    safe_load,
    write_manifest,
)
from dtrain.launch.spawn import latest_checkpoint, spawn_workers
from dtrain.tracking import read_metrics
from tests.faults import KillAt
from tests.helpers import small_job

# Dropout, Adam moments, a cosine schedule with warm-up and per-epoch shuffling: every piece of state that a
# resume must restore exactly. 1294 training samples / (16 x 2 ranks) = 41 steps per epoch.
JOB = small_job(**{"model.dropout": 0.2, "data.batch_size": 16, "optim.scheduler": "cosine", "optim.warmup_steps": 5,
                   "trainer.max_epochs": 2, "checkpoint.every_n_steps": 10, "trainer.log_every_n_steps": 10})
KILL_STEP = 60  # epoch 2, as the step-60 checkpoint is taken: the step-50 one is published by then, 60 cannot be yet


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and a run whose rank 1 SIGKILLed itself after step KILL_STEP."""
    root = tmp_path_factory.mktemp("resume")
    full = spawn_workers(JOB, root / "full", world=2)
    marker = root / "killed.marker"
    with pytest.raises(ProcessExitedException) as info:
        spawn_workers(JOB, root / "killed", world=2, callbacks=[KillAt(1, KILL_STEP, marker)])
    assert marker.exists() and "SIGKILL" in str(info.value)
    shutil.copytree(root / "killed", root / "killed-corrupt")  # for the fallback test, before any resume
    return {"full": full, "root": root}


def _state(run_dir):
    ckpt = safe_load(latest_checkpoint(run_dir) / "model.pt")
    return ckpt["model"], ckpt["optimizer"]["state"], ckpt["scheduler"]


def _assert_bitwise(a, b):
    model_a, opt_a, sched_a = a
    model_b, opt_b, sched_b = b
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    for idx in opt_a:
        for key in opt_a[idx]:
            assert torch.equal(opt_a[idx][key], opt_b[idx][key]), (idx, key)
    assert sched_a["last_epoch"] == sched_b["last_epoch"]


def _resumed_from(run_dir):
    return [r for r in read_metrics(run_dir) if r.get("event") == "resume"]


def test_killed_run_resumes_to_bitwise_equal_weights(runs):
    killed = runs["root"] / "killed"
    assert latest_checkpoint(killed).name == "step_00000050"  # steps 51-60 were done, then the kill
    summary = spawn_workers(JOB, killed, world=2, resume=True)
    (event,) = _resumed_from(killed)
    # mid-epoch: 9 of the 41 steps of epoch 2 done, 9 x 32 samples
    assert (event["epoch"], event["epoch_samples"], event["step"]) == (1, 9 * 32, 50)
    assert summary["steps"] == runs["full"]["steps"] == 82
    assert summary["test"] == runs["full"]["test"]
    _assert_bitwise(_state(killed), _state(runs["root"] / "full"))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(runs, capfd):
    killed = runs["root"] / "killed-corrupt"
    newest = latest_checkpoint(killed)
    model_file = newest / "model.pt"
    model_file.write_bytes(model_file.read_bytes()[:1000])  # truncated, as by a crash or a full disk
    assert "model.pt is truncated" in checkpoint_problem(newest)
    summary = spawn_workers(JOB, killed, world=2, resume=True)
    err = capfd.readouterr().err
    assert f"checkpoint {newest} is unusable (model.pt is truncated" in err
    assert "resuming from the previous checkpoint" in err and "step_00000041" in err.split("resuming from")[1]
    (event,) = _resumed_from(killed)
    assert (event["epoch"], event["epoch_samples"], event["step"]) == (1, 0, 41)  # the end-of-epoch-1 checkpoint
    assert summary["test"] == runs["full"]["test"]
    _assert_bitwise(_state(killed), _state(runs["root"] / "full"))


def test_manifest_detects_every_kind_of_damage(tmp_path, capfd):
    def checkpoint(name):
        """Two ranks' folders, each sealed by its own manifest, merged as Ray merges them."""
        folder = tmp_path / name
        for rank in range(2):
            own = tmp_path / f"{name}-rank{rank}"
            atomic_save({"w": torch.arange(1000.0) * rank}, own / f"part{rank}.pt")
            write_manifest(own, rank, 2, {"step": 5})
            shutil.copytree(own, folder, dirs_exist_ok=True)
        return folder

    good = checkpoint("good")
    assert checkpoint_problem(good) is None and read_manifest(good)["step"] == 5
    flipped = checkpoint("flipped")
    data = bytearray((flipped / "part1.pt").read_bytes())
    data[-100] ^= 0xFF  # same size, one byte changed
    (flipped / "part1.pt").write_bytes(bytes(data))
    assert checkpoint_problem(flipped) == "part1.pt is corrupt (sha256 does not match the manifest)"
    no_rank1 = checkpoint("no_rank1")
    (no_rank1 / "manifest_rank1.json").unlink()  # rank 1 died before sealing its files
    assert checkpoint_problem(no_rank1) == "manifest_rank1.json is missing or unreadable"
    no_file = checkpoint("no_file")
    (no_file / "part0.pt").unlink()
    assert checkpoint_problem(no_file) == "part0.pt is missing"
    assert pick_checkpoint([flipped, no_rank1, good]) == good
    assert capfd.readouterr().err.count("is unusable") == 2
    with pytest.raises(CheckpointError, match="no usable checkpoint to resume from; newest: .*part0.pt is missing"):
        pick_checkpoint([no_file, flipped])
