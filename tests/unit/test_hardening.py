"""Launcher hardening without a real Ray: run directories claimed atomically, Ray's start-up retried on a loaded
machine, a linear model (mlp with no hidden layer) trains."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading

import pytest
import torch
from omegaconf import OmegaConf

from dtrain.config import load_job, to_dict
from dtrain.engine.checkpoint import checkpoint_problem
from dtrain.engine.saving import STAGING_PREFIX, CheckpointWriter
from dtrain.errors import ConfigError, DtrainError
from dtrain.launch import train as launch
from dtrain.launch.spawn import LocalPublisher
from dtrain.launch.worker import run_worker
from tests.helpers import JOBS

TWO_EPOCHS_ONE_RANK = ["trainer.max_epochs=2", "trainer.num_workers=1", "logging.wandb.enabled=false",
                       "logging.progress=false", "trainer.early_stopping.monitor=null"]


def test_two_runs_started_at_once_with_one_name_cannot_share_the_run_directory(tmp_path):
    job = load_job(JOBS / "mlp_digits.yaml", [f"runs_dir={tmp_path}", "name=same"])
    outcomes, start = [], threading.Barrier(8)

    def claim() -> None:
        start.wait()
        try:
            outcomes.append(launch.claim_run_dir(job, resume=False))
        except ConfigError as err:
            outcomes.append(err)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [o for o in outcomes if not isinstance(o, Exception)]
    assert claimed == [tmp_path / "same"] and len(outcomes) == 8
    assert all("already exists" in str(o) for o in outcomes if isinstance(o, Exception))
    assert OmegaConf.load(tmp_path / "same" / "config.yaml").name == "same"  # config.yaml written with the claim
    launch.release_unused(tmp_path / "same")  # it never trained: nothing left to block the name
    assert not (tmp_path / "same").exists()


class _NodeTimesOut:
    """ray.init as on a loaded machine: the node misses Ray's start-up window `failures` times."""

    def __init__(self, failures: int) -> None:
        self.failures, self.calls = failures, 0

    def __call__(self, **kwargs) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise Exception("The current node timed out during startup. This could happen because some of the "
                            "raylet failed to startup or the GCS has become overloaded.")


@pytest.fixture
def no_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)


def test_a_ray_start_up_that_times_out_is_retried(no_ray, monkeypatch, capsys):
    start = _NodeTimesOut(failures=2)
    monkeypatch.setattr(launch.ray_compat, "init_local", start)
    launch.init_ray(None)
    assert start.calls == 3
    assert capsys.readouterr().err.count("Ray's node did not come up in time") == 2


def test_a_ray_that_never_starts_is_one_line_with_advice(no_ray, monkeypatch):
    start = _NodeTimesOut(failures=99)
    monkeypatch.setattr(launch.ray_compat, "init_local", start)
    with pytest.raises(DtrainError, match=r"^Ray could not start on this machine: .* 3 times; .*--address$"):
        launch.init_ray(None)
    assert start.calls == launch.START_ATTEMPTS


def test_mlp_without_hidden_layers_is_a_linear_softmax_model_that_trains(tmp_path, one_thread):
    job = load_job(JOBS / "mlp_digits.yaml", ["model.hidden=[]", "trainer.num_workers=1", "logging.progress=false",
                                              "logging.wandb.enabled=false", f"runs_dir={tmp_path}", "name=linear",
                                              "trainer.max_epochs=15"])
    summary = run_worker(to_dict(job), tmp_path / "linear", LocalPublisher(tmp_path), torch.device("cpu"))
    assert summary["test"]["test/acc"] >= 0.9  # multinomial logistic regression on digits: ~0.95


def test_a_report_barrier_that_times_out_reaches_the_loop_as_a_collective_timeout(monkeypatch):
    """ray.train.report is a barrier of all workers: when rank 1 freezes just before a checkpoint's report, rank 0
    waits there, not in a gloo collective, and Ray's barrier gives up after trainer.collective_timeout_s. The loop
    must see that as a collective timeout (its one line naming the step and the absent rank), as it sees gloo's."""
    import ray.train
    from ray.exceptions import RayTaskError
    from ray.train.v2._internal.exceptions import BroadcastCollectiveTimeoutError

    from dtrain.engine.dist import is_collective_timeout

    cause = BroadcastCollectiveTimeoutError(time_elapsed=8.0, missing_ranks=[1], timeout_s=8.0)
    raised = RayTaskError("broadcast_from_rank_zero", "Traceback: ...", cause).as_instanceof_cause()

    def report(*args, **kwargs):
        raise raised

    monkeypatch.setattr(ray.train, "report", report)
    with pytest.raises(Exception) as caught:
        launch.report({"step": 10}, None)
    assert is_collective_timeout(caught.value)
    assert "ranks have not joined the collective operation: [1]" in str(caught.value)


def test_checkpoint_folders_that_killed_processes_left_are_removed_by_the_next_writer(tmp_path, monkeypatch):
    """A rank killed mid-write (SIGKILL, the OOM killer) cannot clean up: its checkpoint folder stays in the temp
    folder. The next run's writer removes the folders of dead processes, and none of a live one."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan = tmp_path / f"{STAGING_PREFIX}{dead.pid}-x1"
    live = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-x2"
    unrelated = tmp_path / f"{STAGING_PREFIX}notapid"
    for folder in (orphan, live, unrelated):
        folder.mkdir()
        (folder / "model.pt.tmp").write_bytes(b"half a checkpoint")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    CheckpointWriter(0, 1, lambda metrics, folder: None).shutdown()
    assert not orphan.exists() and live.exists() and unrelated.exists()


def test_a_local_runs_checkpoint_files_are_moved_into_place_by_the_writer_thread(tmp_path, monkeypatch, one_thread):
    """The local launcher's writer stages each checkpoint under the run's checkpoints/ folder and its thread moves
    the files to where the ranks' checkpoint is put together: no file is copied (for a large model a copy would take
    seconds), and publishing, on the training thread, is one rename of the folder (by rank 0). The writer thread
    also makes each checkpoint's folder, ahead of it."""
    moved_by: list[str] = []
    made_by: list[str] = []
    move, mkdtemp = shutil.move, tempfile.mkdtemp

    def recording_move(src, dst, *args, **kwargs):
        moved_by.append(threading.current_thread().name)
        return move(src, dst, *args, **kwargs)

    def recording_mkdtemp(*args, **kwargs):
        made_by.append(threading.current_thread().name)
        return mkdtemp(*args, **kwargs)

    def no_copy(src, dst, *args, **kwargs):
        raise AssertionError(f"copied {src} to {dst}")

    monkeypatch.setattr(shutil, "move", recording_move)
    monkeypatch.setattr(shutil, "copyfile", no_copy)
    monkeypatch.setattr(tempfile, "mkdtemp", recording_mkdtemp)
    job = to_dict(load_job(JOBS / "mlp_digits.yaml", TWO_EPOCHS_ONE_RANK))
    run = tmp_path / "run"
    publisher = LocalPublisher(run)
    run_worker(job, run, publisher, torch.device("cpu"), staging=publisher.root, assemble=publisher.assemble)
    published = sorted((run / "checkpoints").iterdir())
    assert [p.name[:5] for p in published] == ["step_", "step_"], published  # and no staging folder left
    assert all(checkpoint_problem(p) is None for p in published)
    # model, train state, RNG state and manifest of each of the 2 checkpoints, all by the writer thread
    assert len(moved_by) == 8 and all(name.startswith("dtrain-checkpoint") for name in moved_by), moved_by
    # the 2 checkpoints' folders and the one made ahead for a third (removed at the end)
    assert len(made_by) == 3 and all(name.startswith("dtrain-checkpoint") for name in made_by), made_by


def test_a_rank_whose_checkpoint_write_failed_keeps_the_others_from_publishing_it(tmp_path):
    """A failed background write (a full disk) is never reported done: the vote keeps saying that a rank is still
    writing, so no rank publishes a checkpoint without its files (and, with checkpoint.keep, deletes an intact one
    for it). The failing rank raises the error at its next step boundary and removes its folder."""
    from dtrain.engine.state import TrainState

    class FullDisk:
        def weights_finite(self) -> bool:
            return True

        def snapshot(self, folder):
            def write() -> None:
                raise OSError(28, "No space left on device")
            return write

    published = []
    writer = CheckpointWriter(0, 1, lambda metrics, folder: published.append(folder), staging=tmp_path)
    try:
        writer.start(FullDisk(), TrainState(step=5), {"step": 5})
        failed = writer.pending.folder
        writer.pending.written.exception(timeout=30)  # the write has ended
        assert writer.writing()  # what this rank tells the vote
        with pytest.raises(OSError, match="No space left"):
            writer.publish_if_due(as_of=6, writing_somewhere=False)
        assert published == [] and not failed.exists() and writer.pending is None
    finally:
        writer.shutdown()
    assert list(tmp_path.iterdir()) == []  # nor the next checkpoint's folder, made ahead


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")
def test_the_checkpoint_writer_thread_runs_at_idle_priority():
    """A background write takes only CPU time that no other thread wants (on a machine whose cores all train, it
    would otherwise take its time from training); the training thread keeps its priority."""
    writer = CheckpointWriter(0, 1, lambda metrics, folder: None)
    try:
        assert writer.executor.submit(os.sched_getscheduler, 0).result() == os.SCHED_IDLE
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        writer.shutdown()


def test_the_local_launcher_deletes_old_checkpoints_off_the_training_thread(tmp_path, monkeypatch):
    """checkpoint.keep: older checkpoints go once a newer one is published, deleted by another thread (a deletion
    can take milliseconds per file); close() waits for the deletions, so the newest `keep` are what is left."""
    deleted_by: list[str] = []
    rmtree = shutil.rmtree

    def recording_rmtree(path, *args, **kwargs):
        deleted_by.append(threading.current_thread().name)
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", recording_rmtree)
    publisher = LocalPublisher(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        folder = tmp_path / f"staged{step}"
        folder.mkdir()
        (folder / "model.pt").write_bytes(b"x")
        (folder / "manifest_rank0.json").write_text(f'{{"step": {step}, "world": 1, "files": {{}}}}')
        publisher({"step": step}, folder)
    publisher.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000030", "step_00000040"]
    assert threading.current_thread().name not in deleted_by and len(deleted_by) >= 2, deleted_by


def test_a_restarted_ray_worker_resumes_from_the_run_dirs_checkpoint_that_ray_never_registered(tmp_path, monkeypatch,
                                                                                            one_thread):
    """A node that dies after its ranks wrote a checkpoint but before Ray's controller registered it (that needs
    every rank's report) leaves ray.train.get_checkpoint() empty in the restarted group. The run dir's newest intact
    checkpoint is the run's own: the restart resumes from it, ahead of an init_checkpoint; a run dir with none
    starts from the init_checkpoint (PBT's seed), or from scratch."""
    import ray.train
    from ray.train import Checkpoint

    class Rank0:
        def get_world_rank(self) -> int:
            return 0

    monkeypatch.setattr(ray.train, "get_context", Rank0)
    job = to_dict(load_job(JOBS / "mlp_digits.yaml", TWO_EPOCHS_ONE_RANK))
    run, fresh, donor = tmp_path / "run", tmp_path / "fresh", tmp_path / "donor"
    fresh.mkdir()
    run_worker(job, run, LocalPublisher(run), torch.device("cpu"))
    newest = sorted((run / "checkpoints").iterdir())[-1]
    shutil.copytree(newest, donor)
    seed = Checkpoint(str(donor))  # (the start, whether another run's: its optimizer takes this run's settings)
    assert launch._resume_dir(None, run, resume=False, seeded=True, tmp=tmp_path) == (newest, False)
    assert launch._resume_dir(seed, run, resume=False, seeded=True, tmp=tmp_path) == (newest, False)
    assert launch._resume_dir(seed, fresh, resume=False, seeded=True, tmp=tmp_path) == (donor, True)
    assert launch._resume_dir(None, fresh, resume=False, seeded=True, tmp=tmp_path) == (None, False)


def test_a_monitor_the_run_does_not_log_stops_the_workers_at_the_first_epoch(tmp_path, one_thread):
    """Where the driver cannot step the model first (streamed data), the loop itself refuses a monitor that names no
    logged metric, at the first epoch end of the final stage and before that epoch's checkpoint; pre-training
    stages, which log other metrics, train on (a DBN monitors its fine-tuning's val/acc)."""
    common = ["trainer.num_workers=1", "logging.progress=false", "logging.wandb.enabled=false", f"runs_dir={tmp_path}"]
    job = load_job(JOBS / "mlp_digits.yaml", [*common, "name=typo", "trainer.early_stopping.monitor=val/accuracy"])
    with pytest.raises(ConfigError, match=r"trainer.early_stopping.monitor: expected a metric this run logs "
                                          r"\(train/loss, train/acc, val/loss, val/acc\), got 'val/accuracy'"):
        run_worker(to_dict(job), tmp_path / "typo", LocalPublisher(tmp_path / "typo"), torch.device("cpu"))
    assert not (tmp_path / "typo" / "checkpoints").exists()
    job = load_job(JOBS / "dbn_digits.yaml", [*common, "name=dbn", "trainer.early_stopping.monitor=val/acc",
                                              "trainer.early_stopping.mode=max", "model.pretrain_epochs=1",
                                              "model.finetune_epochs=2", "model.hidden=[32]"])
    summary = run_worker(to_dict(job), tmp_path / "dbn", LocalPublisher(tmp_path / "dbn"), torch.device("cpu"))
    assert summary["stages"] == 2 and summary["epochs"] == 3 and summary["best"]["monitor"] == "val/acc"
