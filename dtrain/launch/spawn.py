"""Run the training workers in N local processes without Ray (gloo on 127.0.0.1, NCCL with one GPU each): what
`dtrain train` does on one machine when nothing in the job needs Ray (see ray_needed), and what tests and benchmarks
call to run the engine alone.

Checkpoints reported by the loop are assembled in <run_dir>/checkpoints/.partial_step_<step> and renamed to
step_<step> once every rank has added its files; the newest intact one is resumed from.
"""

from __future__ import annotations

import datetime
import math
import os
import shutil
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import reduction
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.compat import torch as torch_compat
from dtrain.engine.checkpoint import checkpoint_order
from dtrain.errors import DtrainError
from dtrain.launch.net import free_port


class LocalPublisher:
    """The loop's publish callable without Ray: keeps each published checkpoint under <run_dir>/checkpoints/.
    The ranks' files are put together in .partial_step_<step>: moved there by each rank's writer thread (assemble),
    or when published; renamed when the writer staged them on the same filesystem (under root). Once every rank's
    are in, rank 0 renames the folder to step_<step>. Checkpoints beyond the newest keep are deleted in a background
    thread (deleting files can take milliseconds each, on a filesystem that discards freed blocks at once); close()
    waits for it."""

    def __init__(self, run_dir: Path, keep: int | None = None) -> None:
        """keep: how many of the newest checkpoints stay (None: all)."""
        self.root, self.keep = Path(run_dir) / "checkpoints", keep
        self.published: list[dict[str, Any]] = []
        self.pruner: ThreadPoolExecutor | None = None

    def assemble(self, folder: Path, step: int) -> Path:
        """Move this rank's files of the checkpoint of step into the folder where the ranks' files are put together,
        and return that folder (the writer thread's CheckpointWriter.assemble)."""
        partial = self._partial(step)
        _move_into(folder, partial)  # every rank adds its files, as Ray merges them
        return partial

    def __call__(self, metrics: dict[str, Any], folder: Path | None) -> None:
        self.published.append(metrics)
        if folder is None:
            return
        partial = self._partial(metrics["step"])
        if folder != partial:  # not assembled by the writer thread: every rank moves its files in now
            self.assemble(folder, metrics["step"])
            dist.barrier() if dist.is_initialized() else None
        if not dist.is_initialized() or dist.get_rank() == 0:  # every rank's files are in
            target = self.root / partial.name.removeprefix(".partial_")
            if target.exists():  # a replayed step after a resume replaces its old copy
                shutil.rmtree(target, ignore_errors=True)
            os.replace(partial, target)  # atomic: a crash leaves either no step_<n> or a complete one
            if self.keep is not None:  # older ones go only once the new one is complete
                self.pruner = self.pruner or ThreadPoolExecutor(1, thread_name_prefix="dtrain-prune")
                self.pruner.submit(self._prune)

    def _partial(self, step: int) -> Path:
        return self.root / f".partial_step_{step:08d}"

    def _prune(self) -> None:
        for old in sorted(self.root.glob("step_*"), key=checkpoint_order)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self) -> None:
        """Wait for the deletions under way."""
        if self.pruner is not None:
            self.pruner.shutdown(wait=True)
            self.pruner = None


def _move_into(src: Path, dst: Path) -> None:
    """Move the files under src into dst, folder by folder (ranks merge their files into one checkpoint at once,
    each file written by one rank), then remove src. A file is renamed, or copied where src is on another
    filesystem (shutil.move)."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        if entry.is_dir():
            _move_into(entry, dst / entry.name)
        else:
            shutil.move(entry, dst / entry.name)
    src.rmdir()


def latest_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest intact checkpoint of a run, this launcher's or Ray Train's (broken ones are reported and
    skipped), or None."""
    from dtrain.engine.checkpoint import pick_checkpoint, run_checkpoints

    return pick_checkpoint(run_checkpoints(run_dir), warn=warn)


PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "dtrain.launch.worker"]
"""Imported once by the fork server that every worker is forked from (each `spawn_workers` call in a process reuses
it), instead of by every worker: torch is slow to import, and DistributedDataParallel's constructor also imports
torch._dynamo. Forking after importing torch is what DataLoader's workers do on Linux; these imports
initialise neither CUDA nor a process group."""


def _preload(strategy: str) -> list[str]:
    """PRELOAD, and for a DeepSpeed job DeepSpeed too (as slow to import as torch), where torch is built without
    CUDA: DeepSpeed picks its accelerator when imported, asking CUDA for its devices, which a process must not do
    before it forks workers that use CUDA."""
    import torch

    if torch.backends.cuda.is_built():
        return PRELOAD
    # What DeepSpeed's auto-detection picks here anyway, without the warning line it prints when it detects.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return PRELOAD + ["deepspeed"] if strategy == "deepspeed" else PRELOAD


def _context(strategy: str) -> Any:
    """The fork server's context. Its imports are those of the first job that starts it in this process; a later
    job's ranks import what else they need themselves."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_preload(strategy))
    return ctx


def start_fork_server(strategy: str) -> None:
    """Start the fork server now, so that its imports run while this process does other work (the driver's checks
    and data load) rather than before the first rank can start; spawn_workers starts it otherwise."""
    from multiprocessing import forkserver

    _context(strategy)
    forkserver.ensure_running()


class _CallerFd:
    """One of the caller's file descriptors, handed to a worker forked by the fork server (which would otherwise
    inherit the server's stdout/stderr from when it started, not the caller's now)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, tuple[Any]]:
        return _CallerFd._received, (reduction.DupFd(self.fd),)  # sent with the process, as multiprocessing does

    @staticmethod
    def _received(dup: Any) -> int:
        return dup.detach()


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _entry(rank: int, world: int, port: int, job: dict, run_dir: str, resume: bool, out: Any,
           device_type: str = "cpu", env: dict[str, str] | None = None, stdio: tuple[tuple[int, int], ...] = (),
           callbacks: tuple[Any, ...] = (), graceful_sigterm: bool = False, keep: int | None = None,
           data: Any = None) -> None:
    from dtrain.engine.stop import request_stop
    from dtrain.launch.worker import run_worker

    if env is not None:  # the caller's environment now, not the fork server's from when it started
        os.environ.clear()
        os.environ.update(env)
    sys.stdout.flush(), sys.stderr.flush()
    for fd, target in stdio:  # the caller's stdout and stderr
        os.dup2(fd, target)
        os.close(fd)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads_per_rank(job))
    if graceful_sigterm:  # checkpoint at the next agreed step boundary and stop (else SIGTERM ends the process)
        signal.signal(signal.SIGTERM, request_stop)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 or job["trainer"]["strategy"] == "deepspeed":  # DeepSpeed needs a process group even alone
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=job["trainer"]["collective_timeout_s"]))
    try:
        resume_dir = latest_checkpoint(Path(run_dir), warn=rank == 0) if resume else None
        try:
            publisher = LocalPublisher(Path(run_dir), keep)
            try:
                summary = run_worker(job, run_dir, publisher, device, resume_dir, data, callbacks=list(callbacks),
                                     staging=publisher.root, assemble=publisher.assemble)
            finally:
                publisher.close()
        except DtrainError as err:
            out.put(err)  # so that spawn_workers raises the user's mistake as itself
            raise
        if rank == 0:
            out.put(summary)
        if dist.is_initialized():
            # Leave together: a rank tearing gloo down while its peer is still mid-collective can abort the peer
            # ("terminate called without an active exception") after training has already finished. Only on
            # success: after an error the peer may never reach the barrier.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def threads_per_rank(job: dict[str, Any]) -> int:
    """A rank's intra-op threads, as Ray sets them for its workers: OMP_NUM_THREADS where the caller set it, else
    the whole CPUs of trainer.cpus_per_worker (at least 1)."""
    chosen = os.environ.get("OMP_NUM_THREADS", "")
    if chosen.isdigit() and int(chosen) > 0:
        return int(chosen)
    return max(1, math.floor(job["trainer"]["cpus_per_worker"]))


def spawn_workers(job: dict[str, Any], run_dir: str | Path, world: int = 2, resume: bool = False,
                  device: str = "cpu", callbacks: tuple[Any, ...] = (), graceful_sigterm: bool = False,
                  start_method: str = "forkserver", keep: int | None = None, data: Any = None,
                  stdout: int | None = None) -> dict[str, Any]:
    """Train job in `world` local processes on device "cpu" (gloo) or "cuda" (one GPU per rank, NCCL);
    returns rank 0's summary. callbacks: engine callbacks installed in every rank (picklable). graceful_sigterm:
    a SIGTERM to a worker makes the run checkpoint at the next step boundary and raise Preempted (off by default:
    torch's process launcher stops the other ranks with SIGTERM when one fails).

    start_method "fork" forks the ranks from this process as it is, imports included: only for a process with no
    threads, such as one that the fork server has just forked itself (what the random-kill test starts and kills).
    keep: how many of the newest checkpoints stay in <run_dir>/checkpoints (None: all). Interrupted (Ctrl-C, or
    SIGTERM made one), the ranks are stopped before the exception goes on: SIGTERM, then SIGKILL after STOP_GRACE_S.
    data: the job's DataBundle if the caller loaded it already (load_data(shared=True): every rank reads that one
    copy); else each rank loads its own. stdout: the file descriptor the ranks' standard output goes to (default:
    this process's; forkserver only).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected cpu or cuda, got {device!r}")
    if device == "cuda" and world > torch.cuda.device_count():
        raise ValueError(f"device=cuda: {world} ranks need {world} GPUs, found {torch.cuda.device_count()}")
    if start_method not in ("forkserver", "fork"):
        raise ValueError(f"start_method: expected forkserver or fork, got {start_method!r}")
    if stdout is not None and start_method != "forkserver":
        raise ValueError("stdout: a forked rank keeps this process's standard output")
    for stale in (Path(run_dir) / "checkpoints").glob(".partial_*"):  # a merge that a killed run left half done
        shutil.rmtree(stale, ignore_errors=True)
    ctx = _context(job["trainer"]["strategy"]) if start_method == "forkserver" else mp.get_context("fork")
    out = ctx.SimpleQueue()
    sys.stdout.flush(), sys.stderr.flush()
    # A forked rank has this process's environment and file descriptors already.
    env, stdio = None, ()
    if start_method == "forkserver":
        sources = {1: 1 if stdout is None else stdout, 2: 2}
        env, stdio = dict(os.environ), tuple((_CallerFd(fd), target) for target, fd in sources.items() if _is_open(fd))
    args = (world, free_port(), job, str(run_dir), resume, out, device, env, stdio, tuple(callbacks),
            graceful_sigterm, keep, data)
    torch_compat.quiet_rank_terminations()
    ranks = mp.start_processes(_entry, args=args, nprocs=world, start_method=start_method, join=False)
    try:
        while not ranks.join():
            pass
    except mp.ProcessRaisedException:
        while not out.empty():  # a DtrainError from a rank is raised here as itself (one line at the CLI)
            item = out.get()
            if isinstance(item, DtrainError):
                raise item from None
        raise
    except BaseException:  # interrupted: the ranks must not outlive this process
        _stop(ranks.processes)
        raise
    return out.get()


STOP_GRACE_S = 30


def _stop(processes: list[Any]) -> None:
    for p in processes:
        if p.is_alive():
            p.terminate()
    for p in processes:
        p.join(STOP_GRACE_S)
        if p.is_alive():
            p.kill()
            p.join()


def fit_local(job: Any, resume: bool = False, data: Any = None) -> dict[str, Any]:
    """`dtrain train` without Ray: the job's workers as processes on this machine (the quickest start); returns
    summary.json's content with the run's cost. The run directory is claimed first, as under Ray; resume continues
    from the newest intact checkpoint of either launcher. The progress bar follows rank 0's metrics.jsonl, as under
    Ray. data: as for spawn_workers."""
    from dtrain.config import to_dict
    from dtrain.launch import cost
    from dtrain.launch.progress import ProgressFollower
    from dtrain.launch.train import claim_run_dir, release_unused, worker_group

    workers, use_gpu = check_local_run(job)
    run_dir = claim_run_dir(job, resume)
    follower = ProgressFollower(run_dir) if job.logging.progress else None
    relay = LineRelay() if follower else None  # the ranks' lines go above the bar, not through it
    try:
        with cost.Segment(run_dir, worker_group(job, workers, use_gpu)):
            if follower:
                follower.start()
            spawn_workers(to_dict(job), run_dir, world=workers, resume=resume, device="cuda" if use_gpu else "cpu",
                          keep=job.checkpoint.keep, data=data, stdout=relay.fd if relay else None)
    except BaseException:
        if not resume:
            release_unused(run_dir)  # a run that never trained leaves no folder behind to block its name
        raise
    finally:
        if relay:
            relay.close()
        if follower:
            follower.stop()
    return cost.add_to_summary(run_dir, cost.run_cost(run_dir, to_dict(job.cost)))


class LineRelay:
    """A pipe whose lines a thread writes to this process's sys.stdout as they come: what the ranks print then
    passes through this process, where a progress bar drawn on the terminal (rich, which redirects sys.stdout
    while it draws) prints them above itself, as it does for Ray's workers' lines. close() waits for the last."""

    def __init__(self) -> None:
        read, self.fd = os.pipe()
        self._reader = threading.Thread(target=self._relay, args=(read,), daemon=True, name="dtrain-ranks-stdout")
        self._reader.start()

    @staticmethod
    def _relay(read: int) -> None:
        with open(read, "rb", buffering=0) as pipe:
            for line in iter(pipe.readline, b""):
                sys.stdout.write(line.decode(errors="replace"))
                sys.stdout.flush()

    def close(self, timeout_s: float = 5.0) -> None:
        """Close this process's end for writing (once the ranks closed theirs, the reader sees the end), and wait
        for the reader, at most timeout_s: a process the ranks started (a compile worker, say) may still hold the
        pipe open, and the command must not wait for it to end."""
        os.close(self.fd)
        self._reader.join(timeout_s)


def ray_needed(job: Any) -> str | None:
    """What in job needs Ray, as `<key>: <why>` (restarts, an elastic worker range, streamed data, a run directory
    in object storage), or None when its workers can run as local processes."""
    from dtrain.config import to_objects, worker_bounds
    from dtrain.data.stream_source import streams
    from dtrain.storage import is_uri

    t, data = job.trainer, to_objects(job).data
    if streams(data):
        return f"data.name: {data.name} streams through Ray Data"
    if is_uri(str(job.runs_dir)):
        return f"runs_dir: {job.runs_dir}: a run directory in object storage needs Ray"
    bounds = worker_bounds(t.num_workers)
    if bounds is not None and bounds[0] != bounds[1]:
        return f"trainer.num_workers: an elastic range {list(bounds)} needs Ray"
    if t.max_failures:
        return f"trainer.max_failures: {t.max_failures}: restarts need Ray"
    return None


def check_local_run(job: Any) -> tuple[int, bool]:
    """(workers, use_gpu) of a run without Ray, or a ConfigError naming the setting that needs Ray."""
    from dtrain.errors import ConfigError
    from dtrain.launch.train import fit_workers

    reason = ray_needed(job)
    if reason is not None:
        raise ConfigError(f"{reason}; --local takes in-memory data, a fixed worker count, no restarts and a run "
                          "directory on this machine (run without --local)")
    return fit_workers(job, torch.cuda.device_count(), os.cpu_count() or 1, "this machine")
