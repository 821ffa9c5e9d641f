"""Checkpoints off the training thread: the state is snapshotted at a step boundary, written, hashed and sealed in
a background thread, and published at the first step boundary at which every rank knows that every rank's write is
done (the step vote, dist.StepVote, carries each rank's flag): training does not wait for the disk, nor for the
other ranks (a checkpoint published elsewhere, at the run's end or before the next one, waits for them at a barrier).

The writer thread runs at idle priority (Linux's SCHED_IDLE): it takes only CPU time that no other thread wants, so
on a node whose cores all train it does not slow the steps; it writes in the gaps (waits for the other ranks, for
data, for the device) or, at the latest, while the training thread waits for it before the next checkpoint.

A launcher whose publish is a barrier of the ranks itself (Ray Train's report) has the writer thread publish each
checkpoint as soon as the rank's write is done (publish_in_writer): the barrier then waits for every rank's write,
off the training thread, and the step vote only tells the training thread when the publish is over.

Guarantees: the snapshot is the state of the step it was taken at (weights, optimizer, schedule, scaler, position,
every rank's RNG), so resuming from it is exact; the manifest is written last, after every file is flushed to disk;
a folder is published (to Ray, or to the local run dir) only once complete, so a crash mid-write leaves the previous
checkpoint as the newest intact one (a rank whose write fails raises its error at its next step boundary and never
tells the vote it is done, so no rank publishes that checkpoint); at most one write is in flight: when a new
checkpoint is due before the last one is written, the training thread waits for it (the loop is as slow as the disk,
never further behind).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from dtrain.engine import dist
from dtrain.engine.checkpoint import atomic_save, capture_rng, rng_tensors, write_manifest
from dtrain.engine.state import TrainState
from dtrain.errors import TrainingError

STATE_FILE = "train_state.pt"


STAGING_PREFIX = "dtrain-ckpt-"
"""Checkpoint folders being written or downloaded are named dtrain-ckpt-<pid>-* (in the system's temp folder, or
in the folder a launcher stages them in)."""


def staging_prefix() -> str:
    """The name prefix of this process's checkpoint folders in the temp folder (tempfile's prefix=)."""
    return f"{STAGING_PREFIX}{os.getpid()}-"


def remove_orphaned_staging(root: Path | None = None) -> None:
    """Remove the checkpoint folders that dead processes left in root (default: the temp folder): a SIGKILL or the
    OOM killer ends a rank before it can clean up, and each such death would otherwise leave up to a checkpoint's
    size behind. Folders of live processes (by the pid in their name) stay."""
    for folder in Path(root or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = folder.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether the process runs (a zombie, killed but not yet reaped, does not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # another user's process
        return True


def idle_priority() -> None:
    """Run the calling thread only on CPU time no other thread of the machine wants (Linux's SCHED_IDLE; elsewhere
    it keeps its priority). The writer thread's initializer: a background write must not take a core from training."""
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


@dataclasses.dataclass
class _Pending:
    """A checkpoint being written: the write (its result: the folder to publish), the folder it writes (removed if
    the write fails), the metrics to publish with it, its step."""
    written: Future
    """Its result: the folder to publish, or None if the writer thread published it."""
    folder: Path
    metrics: dict[str, Any]
    step: int


def _run_now(write: Callable[[], Path]) -> Future:
    """write run on this thread, as a finished Future: its error is raised where its result is asked for, as a
    background write's is."""
    done: Future = Future()
    try:
        done.set_result(write())
    except Exception as err:  # noqa: BLE001 - raised on the training thread by finish()
        done.set_exception(err)
    return done


Assemble = Callable[[Path, int], Path]
"""Called in the writer thread with a rank's written and sealed checkpoint folder and the checkpoint's step: moves
its files to where the launcher assembles the ranks' checkpoint, and returns that folder (publish gets it)."""


class CheckpointWriter:
    """One rank's checkpoint writes: start() snapshots and writes in the background, publish_if_due() publishes.

    staging: the folder the checkpoint folders are written in (the launcher's choice: on the run folder's filesystem,
    publishing is a rename); None: the system's temp folder. assemble: what the writer thread does with the folder
    once written (None: the folder is published as it is). publish_in_writer: publish is a barrier of the ranks
    itself, called by every rank for each checkpoint in the same order; the writer publishes each checkpoint as soon
    as this rank's write is done (with background=False, on the training thread when the checkpoint is taken)."""

    def __init__(self, rank: int, world: int, publish: Callable[[dict[str, Any], Path | None], None],
                 background: bool = True, staging: Path | None = None, assemble: Assemble | None = None,
                 publish_in_writer: bool = False) -> None:
        self.rank, self.world, self.publish, self.staging, self.assemble = rank, world, publish, staging, assemble
        self.publish_in_writer = publish_in_writer
        # one thread for all the writes of the run: started once, not at each checkpoint
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dtrain-checkpoint",
                                           initializer=idle_priority) if background else None
        self.pending: _Pending | None = None
        remove_orphaned_staging()
        if staging is not None:
            staging.mkdir(parents=True, exist_ok=True)
            remove_orphaned_staging(staging)
        # The next checkpoint's folder, made ahead in the writer thread: creating it costs the training thread more
        # than the rest of the snapshot together.
        self.next_folder: Future | None = None
        self._make_next_folder()

    def start(self, strategy: Any, state: TrainState, metrics: dict[str, Any]) -> None:
        """Snapshot the state now (waiting first for the previous write, if it is still going) and write it."""
        self.finish()
        if not strategy.weights_finite():
            raise TrainingError("training stopped: the weights became non-finite; the last good checkpoint is kept")
        folder = self._take_folder()
        write_strategy = strategy.snapshot(folder)
        train_state, rng = dataclasses.asdict(state), capture_rng()  # copies, taken at this step
        position = {k: train_state[k] for k in ("stage", "epoch", "epoch_samples", "step")}

        def write() -> Path | None:
            write_strategy()
            if self.rank == 0:
                atomic_save(train_state, folder / STATE_FILE)
            atomic_save(rng_tensors(rng), folder / f"rng_rank{self.rank}.pt")
            # Sealed last: a checkpoint missing any rank's manifest or file is detected and skipped on resume.
            write_manifest(folder, self.rank, self.world, position)
            written = folder if self.assemble is None else self.assemble(folder, position["step"])
            if not self.publish_in_writer:
                return written
            self.publish(metrics, written)
            return None  # published

        written = self.executor.submit(write) if self.executor is not None else _run_now(write)
        self.pending = _Pending(written, folder, metrics, state.step)
        self._make_next_folder()

    def _new_folder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix=staging_prefix(), dir=self.staging))

    def _make_next_folder(self) -> None:
        """Have the writer thread make the next checkpoint's folder once it is free (after the write in flight)."""
        if self.executor is not None:
            self.next_folder = self.executor.submit(self._new_folder)

    def _claim_next_folder(self) -> Path | None:
        """The folder made ahead (waiting for the writer thread to make it), now the caller's; None if there is none
        or making it failed."""
        ready, self.next_folder = self.next_folder, None
        return ready.result() if ready is not None and ready.exception() is None else None

    def _take_folder(self) -> Path:
        """The folder to write the checkpoint being started in: the one made ahead, else (synchronous writes, or
        making it ahead failed: its error is raised here) a new one."""
        return self._claim_next_folder() or self._new_folder()

    def writing(self) -> bool:
        """Whether this rank's write of the pending checkpoint is still going, or failed: either way the other ranks
        must not publish the checkpoint without this rank's files."""
        return self.pending is not None and (not self.pending.written.done() or self._failed())

    def publish_if_due(self, as_of: int, writing_somewhere: bool) -> bool:
        """Publish the pending checkpoint if it is due at this step boundary, given what the step vote says: whether
        some rank was still writing at step boundary as_of. Due once no rank was, at a boundary after the one the
        checkpoint was taken at; every rank then knows every rank's write is done, so none waits for the others.
        Every rank gets the same answer, so every rank publishes at the same step, as Ray's report requires. Returns
        whether it published. A write of this rank's that failed raises its error here."""
        if self.pending is not None and self._failed():
            self._publish(everyone_wrote=False)  # raises the write's error
        if self.pending is None or as_of <= self.pending.step or writing_somewhere:
            return False
        self._publish(everyone_wrote=True)
        return True

    def _failed(self) -> bool:
        written = self.pending.written
        return written.done() and written.exception() is not None

    def finish(self) -> None:
        """Wait for the pending write, then, once every rank's is done (a barrier), publish it (the publisher owns
        the folder from then on), unless the writer thread published it; a write that failed raises its error here."""
        self._publish(everyone_wrote=False)

    def _publish(self, everyone_wrote: bool) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return
        try:
            folder = pending.written.result()
        except BaseException:
            shutil.rmtree(pending.folder, ignore_errors=True)
            raise
        if folder is None:
            return
        if not everyone_wrote:
            dist.barrier()
        self.publish(pending.metrics, folder)

    def close(self) -> None:
        """After a failure: let a write in progress end, publish nothing, remove its folder."""
        pending, self.pending = self.pending, None
        if pending is not None:
            wait([pending.written])
            shutil.rmtree(pending.folder, ignore_errors=True)

    def shutdown(self) -> None:
        """At the run's end (after finish or close): the writer thread ends, the folder made ahead is removed."""
        if self.executor is not None:
            self.executor.shutdown(wait=True)
        if (spare := self._claim_next_folder()) is not None:
            shutil.rmtree(spare, ignore_errors=True)
