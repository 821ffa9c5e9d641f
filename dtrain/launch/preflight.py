"""`dtrain preflight JOB`: in about a minute, whether the job will run where it is sent, and what it will cost.

The driver checks what it can without workers (the data loads, the model builds, the trackers, the cluster has the
workers' resources and some node can hold each worker); then Ray Train places the job's workers with the job's own
ScalingConfig, and every rank runs the training loop for a few real optimizer steps of the job's model on its data
(the same build_worker and engine loop as `dtrain train`), an all-reduce across the ranks, a checkpoint written
through the engine's writer into the job's runs_dir and read back by every rank, and (rank 0) the trackers'
handshake. Each rank's node, device, peak memory and step time come back to the driver, which projects the job's
time per epoch, total time and cost. Problems are collected, not raised: the caller prints one line per problem.
Nothing is left behind: the probe folder under runs_dir (Ray's bookkeeping included) is removed, the workers end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dtrain.compat import ray as ray_compat
from dtrain.config import to_dict
from dtrain.engine.callbacks import Callback
from dtrain.errors import ConfigError, DtrainError
from dtrain.launch import cost

PROBE_PREFIX = ".dtrain-preflight-"
TIMED_STEPS = 20
"""Optimizer steps timed after the first (warm-up) one; their median is the step time the projection uses."""
START_TIMEOUT_S = 60.0
"""Longest wait for the workers' placement (the job's trainer.start_timeout_s when shorter)."""


@dataclass
class Report:
    """What preflight found: one row per rank, the projection, and one line per problem."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    projection: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    trackers: list[str] = field(default_factory=list)


def run_preflight(job: DictConfig, data: Any, *, address: str | None = None,
                  memory_limit: float | None = None) -> Report:
    """Check job on the cluster at address (or an embedded Ray); data: the job's loaded DataBundle, None when it
    failed to load (the driver's problems are then all that is checked). memory_limit: bytes one worker's step may
    peak at (resident memory on CPU, allocated device memory on GPU)."""
    from dtrain.launch.train import init_ray, resolve_resources

    report = Report()
    init_ray(address)
    try:
        workers, use_gpu = resolve_resources(job)
        _check_placement(job, workers, use_gpu)
    except ConfigError as err:
        report.problems.append(str(err))
        return report
    if data is None:
        return report
    runs_dir = Path(job.runs_dir).expanduser().absolute()
    created = _missing_parents(runs_dir)
    probe_dir = runs_dir / f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        rows, trackers, problems = _probe(job, data, workers, use_gpu, probe_dir, memory_limit, local=address is None)
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
        for folder in created:  # folders of runs_dir that the probe created (deepest first), if nothing else is there
            with contextlib.suppress(OSError):
                folder.rmdir()
    report.rows, report.trackers, report.problems = rows, trackers, problems
    if rows and not any("step_s" not in r for r in rows):
        report.projection = project(job, rows, cost.WorkerGroup(workers, job.trainer.cpus_per_worker,
                                                                1.0 if use_gpu else 0.0))
    return report


def _missing_parents(path: Path) -> list[Path]:
    """The folders from path up that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _check_placement(job: DictConfig, workers: int, use_gpu: bool) -> None:
    """ConfigError when the cluster's nodes cannot hold every worker's bundle (CPUs, GPU) at once: resolve_resources
    counts the cluster's totals; a worker cannot straddle two nodes."""
    import ray

    cpus, gpus = float(job.trainer.cpus_per_worker), 1.0 if use_gpu else 0.0
    fits = 0
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        have = node.get("Resources") or {}
        per_node = int(have.get("CPU", 0) // cpus) if cpus else 10**6
        if gpus:
            per_node = min(per_node, int(have.get("GPU", 0) // gpus))
        fits += per_node
    if fits < workers:
        raise ConfigError(f"trainer.num_workers: {workers} workers x {cpus:g} CPUs{' + 1 GPU' if gpus else ''} "
                          f"do not fit the cluster's nodes: at most {fits} such workers fit (a worker cannot span "
                          "nodes); lower trainer.num_workers or trainer.cpus_per_worker")


def _probe(job: DictConfig, data: Any, workers: int, use_gpu: bool, probe_dir: Path, memory_limit: float | None,
           local: bool) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Run probe_loop_per_worker on the job's workers; (rows, tracker lines, problems)."""
    import ray
    from ray.train import FailureConfig, LoggingConfig, RunConfig
    from ray.util.queue import Queue

    from dtrain.launch.project import shipped_paths
    from dtrain.launch.train import _fit, find_user_error, scaling_config, to_object_store

    probe_job = job.copy()
    probe_job.logging.progress = False
    probe_job.trainer.start_timeout_s = min(float(job.trainer.start_timeout_s), START_TIMEOUT_S)
    storage = Path(tempfile.mkdtemp(prefix="dtrain-preflight-ray-"))  # Ray Train's own records: nothing to keep
    findings = Queue(maxsize=1, actor_options={"num_cpus": 0})  # rank 0 hands every rank's findings back here
    trainer = ray_compat.torch_trainer(
        probe_loop_per_worker,
        train_loop_config={"job": to_dict(job), "data": ray.put(to_object_store(data)), "probe_dir": str(probe_dir),
                           "memory_limit": memory_limit, "sys_path": shipped_paths(), "findings": findings},
        scaling_config=scaling_config(job, workers, use_gpu, elastic=False),  # an elastic job's min
        run_config=RunConfig(name="preflight", storage_path=str(storage), failure_config=FailureConfig(max_failures=0),
                             logging_config=LoggingConfig(log_level="WARNING")),
    )
    try:
        _fit(trainer, probe_job, probe_dir, workers, local=local)
        found = findings.get(timeout=30)
    except DtrainError as err:
        return [], [], [str(err)]
    except Exception as err:  # noqa: BLE001 - a worker that died (out of memory, a node lost): one line, not a trace
        user = find_user_error(err)
        return [], [], [str(user) if user else f"the workers failed: {_last_line(err)}"]
    finally:
        shutil.rmtree(storage, ignore_errors=True)
        findings.shutdown()
    return found["rows"], found["trackers"], found["problems"]


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def probe_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function for preflight: probe this rank, gather every rank's findings, report them."""
    import ray
    import ray.train.torch
    import torch.distributed as tdist

    from dtrain.config import to_objects
    from dtrain.launch.project import use_paths
    from dtrain.launch.train import from_object_store

    use_paths(config.get("sys_path", ()))
    node = f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:6]}"
    data = from_object_store(ray.get(config["data"]))
    job_dict = config["job"]
    found = probe_rank(to_objects(job_dict), job_dict, ray.train.torch.get_device(), data, Path(config["probe_dir"]),
                       node, config.get("memory_limit"))
    everyone: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(everyone, found)
    if tdist.get_rank() == 0:
        config["findings"].put({"rows": [f["row"] for f in everyone], "trackers": everyone[0]["trackers"],
                                "problems": [p for f in everyone for p in f["problems"]]})


def probe_rank(job: Any, job_dict: dict[str, Any], device: Any, data: Any, probe_dir: Path, node: str,
               memory_limit: float | None) -> dict[str, Any]:
    """This rank's probe: a few optimizer steps through the engine's loop, an all-reduce, a checkpoint written to
    probe_dir and read back, the trackers' handshake on rank 0. Returns {row, trackers, problems}."""
    import torch

    from dtrain.engine import dist
    from dtrain.engine.loop import EarlyStoppingConfig, RunContext, fit
    from dtrain.launch.worker import build_worker

    rank, world = dist.rank(), dist.world_size()
    problems: list[str] = []
    created = _missing_parents(probe_dir.parent)
    worker = build_worker(job, device, data)
    steps_per_epoch = worker.loaders.train.steps_per_epoch()
    timer = StepTimer(device)
    saver = ProbeCheckpoint(probe_dir / "checkpoint", rank, node, device, problems)
    loop = dataclasses.replace(worker.loop, max_epochs=1, max_steps=min(TIMED_STEPS + 1, steps_per_epoch),
                               checkpoint_every_n_epochs=1, checkpoint_every_n_steps=0,
                               early_stopping=EarlyStoppingConfig())
    try:
        fit(worker.model, worker.loaders, worker.strategy, loop,
            RunContext(rank, world, saver.publish, lambda record: None, callbacks=[timer]))
    except (torch.OutOfMemoryError, MemoryError) as err:
        raise ConfigError(f"model: the training step ran out of memory on rank {rank} ({node}, {device}): "
                          f"{str(err).splitlines()[0][:200]}; make the model or data.batch_size smaller") from None
    peak = timer.peak
    if memory_limit is not None and peak > memory_limit:
        problems.append(f"model: the training step peaked at {peak / 2**30:.2f} GiB on rank {rank} ({node}), over the "
                        f"memory limit of {memory_limit / 2**30:.2f} GiB; make the model or data.batch_size smaller")
    total = dist.all_reduce_sum(torch.ones((), device=device) * (rank + 1)).item()
    if round(total) != world * (world + 1) // 2:
        problems.append(f"trainer: the all-reduce across {world} ranks gave {total:g} on rank {rank} ({node}), "
                        f"expected {world * (world + 1) // 2}")
    saver.read_back(worker.strategy)
    trackers = tracker_handshake(job_dict, probe_dir, problems) if rank == 0 else []
    # every rank is done with the probe folder before it goes (from every node: they may not share storage)
    _everyone(True, device)
    shutil.rmtree(probe_dir, ignore_errors=True)
    for folder in created:
        with contextlib.suppress(OSError):
            folder.rmdir()
    # the checkpoint's work off the training thread: the rest of a background write, and the copy to the run's
    # storage that stands in for Ray's upload
    background_s = max(0.0, saver.published - timer.epoch_end) if saver.published else 0.0
    row = {"rank": rank, "node": node, "device": str(device), "peak_memory_bytes": peak,
           "steps_per_epoch": steps_per_epoch, "cores": usable_cores(), "checkpoint_background_s": background_s,
           **timer.times()}
    return {"row": row, "trackers": trackers, "problems": problems}


class StepTimer(Callback):
    """Engine callback: when the set-up and each optimizer step ended, and the peak memory after the steps."""

    def __init__(self, device: Any) -> None:
        self.device, self.ends, self.peak, self.epoch_end = device, [], 0, 0.0

    def on_setup(self, strategy: Any, model: Any, rank: int) -> None:
        self.ends.append(time.perf_counter())

    def on_step_end(self, state: Any, rank: int) -> None:
        self.ends.append(time.perf_counter())
        self.peak = peak_memory(self.device)

    def on_epoch_end(self, state: Any, rank: int) -> None:
        self.epoch_end = time.perf_counter()

    def times(self) -> dict[str, float]:
        """first_step_s (warm-up included), step_s (median of the later steps, or the first one alone) and
        epoch_end_s (from the last step until the training thread goes on: validation and the checkpoint's part on
        that thread, the whole write when the job writes checkpoints in the foreground)."""
        laps = [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]
        if not laps:
            return {}
        return {"first_step_s": laps[0], "step_s": statistics.median(laps[1:]) if len(laps) > 1 else laps[0],
                "epoch_end_s": max(0.0, self.epoch_end - self.ends[-1])}


def peak_memory(device: Any) -> int:
    """Peak bytes: allocated on a CUDA device, else this process's peak resident set."""
    import resource

    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class ProbeCheckpoint:
    """The loop's publish for preflight: copies this rank's checkpoint files into folder (as Ray's upload to the
    run's storage would), then read_back checks every rank's files there and loads them through the strategy."""

    def __init__(self, folder: Path, rank: int, node: str, device: Any, problems: list[str]) -> None:
        self.folder, self.rank, self.node, self.device, self.problems = folder, rank, node, device, problems
        self.written, self.published = False, 0.0

    def publish(self, metrics: dict[str, Any], local: Path | None) -> None:
        if local is None:
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            shutil.copytree(local, self.folder, dirs_exist_ok=True)
            self.written = True
        except OSError as err:
            self.problems.append(f"runs_dir: rank {self.rank} ({self.node}) cannot write a checkpoint under "
                                 f"{self.folder.parent.parent}: {err.strerror or err}")
        finally:
            shutil.rmtree(local, ignore_errors=True)
            self.published = time.perf_counter()

    def read_back(self, strategy: Any) -> None:
        """Every rank checks the whole checkpoint (all ranks' files and manifests), then all load it or none does
        (a strategy's load may be collective)."""
        from dtrain.engine.checkpoint import checkpoint_problem

        if not _everyone(self.written, self.device):
            return  # a rank could not write (that rank says so): there is no whole checkpoint to read
        problem = checkpoint_problem(self.folder)
        if problem is not None:
            self.problems.append(f"runs_dir: rank {self.rank} ({self.node}) does not see the checkpoint the ranks "
                                 f"wrote under {self.folder.parent.parent} ({problem}); runs_dir must be storage "
                                 "every node shares")
        if not _everyone(problem is None, self.device):
            return
        try:
            strategy.load(self.folder)
        except Exception as err:  # noqa: BLE001 - reported as a problem of this rank
            self.problems.append(f"runs_dir: rank {self.rank} ({self.node}) could not read back the checkpoint: "
                                 f"{_last_line(err)}")


def _everyone(flag: bool, device: Any) -> bool:
    """Whether flag holds on every rank (a collective: every rank calls it)."""
    import torch

    from dtrain.engine import dist

    return dist.all_reduce_sum(torch.tensor(float(flag), device=device)).item() == dist.world_size()


def tracker_handshake(job: dict[str, Any], run_dir: Path, problems: list[str]) -> list[str]:
    """On rank 0, where the run's trackers run: each configured tracker's state, as a line; problems appended."""
    from dtrain.tracking import wandb_mode
    from dtrain.tracking.mlflow_sink import connect, mlflow_settings
    from dtrain.tracking.tensorboard_sink import check_writable, tensorboard_dir

    logging, lines = job.get("logging") or {}, []
    try:
        mode = wandb_mode(logging.get("wandb") or {})
        lines.append(f"W&B: {mode or 'off'}")
    except ConfigError as err:
        problems.append(str(err))
    folder = tensorboard_dir(run_dir, job)
    if folder is not None:
        created = _missing_parents(folder)
        try:
            check_writable(folder)
            lines.append(f"TensorBoard: {folder} writable")
        except ConfigError as err:
            problems.append(str(err))
        for made in created:
            with contextlib.suppress(OSError):
                made.rmdir()
    try:
        settings = mlflow_settings(job)
        if settings is not None:
            connect(settings)
            lines.append(f"MLflow: {settings['tracking_uri']} answers")
    except ConfigError as err:
        problems.append(str(err))
    return lines


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def project(job: DictConfig, rows: list[dict[str, Any]], group: cost.WorkerGroup) -> dict[str, Any]:
    """Steps per epoch, time per epoch and total time of the job, from the slowest rank's step time (DDP ranks wait
    for each other), its time for the epoch's end (validation, checkpoint) and the checkpoint work the steps lose
    to; and the projected cost."""
    per_epoch = rows[0]["steps_per_epoch"]
    step_s = max(r["step_s"] for r in rows)
    end_s = max(r["epoch_end_s"] for r in rows) + _checkpoints_per_epoch(job, per_epoch) * max(
        _lost_to_background(job, rows, r) for r in rows)
    epochs = job.trainer.max_epochs
    steps = per_epoch * epochs
    if job.trainer.max_steps:
        steps = min(steps, job.trainer.max_steps)
        epochs = min(epochs, -(-steps // per_epoch))
    epoch_s = per_epoch * step_s + end_s
    total_s = steps * step_s + epochs * end_s
    return {"steps_per_epoch": per_epoch, "epoch_s": epoch_s, "epochs": epochs, "steps": steps, "total_s": total_s,
            "cost": cost.price(group.hours(total_s), to_dict(job.cost))}


def _checkpoints_per_epoch(job: DictConfig, per_epoch: int) -> float:
    every_epochs, every_steps = job.checkpoint.every_n_epochs, job.checkpoint.every_n_steps
    return (1 / every_epochs if every_epochs else 0.0) + (per_epoch / every_steps if every_steps else 0.0)


def _lost_to_background(job: DictConfig, rows: list[dict[str, Any]], row: dict[str, Any]) -> float:
    """The seconds of row's steps that its checkpoint's background work (the write, the upload) takes per checkpoint:
    none where its node has a core to spare for each rank's, all of it where the ranks' threads take every core
    (then the work and the steps share them)."""
    ranks = sum(r["node"] == row["node"] for r in rows)
    threads = max(1, round(job.trainer.cpus_per_worker)) if row["device"] == "cpu" else 1
    spare = max(0, row["cores"] - ranks * threads)
    return row["checkpoint_background_s"] * max(0.0, 1 - spare / ranks)


def parse_bytes(text: str) -> float:
    """'1.5GiB', '800MB', '2G', '1000000' -> bytes; ConfigError otherwise."""
    units = {"": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20, "g": 1e9, "gb": 1e9,
             "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}
    raw = text.strip().lower()
    number = raw.rstrip("kmgtib")
    try:
        value = float(number) * units[raw[len(number):].strip()]
    except (ValueError, KeyError):
        raise ConfigError(f"--memory-limit: expected a size such as 2GiB or 800MB, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"--memory-limit: expected a size > 0, got {text!r}")
    return value


def format_report(report: Report, job: DictConfig) -> list[str]:
    """The table and projection lines `dtrain preflight` prints."""
    lines = []
    if report.rows:
        lines.append(f"{'rank':>4}  {'node':<24} {'device':<8} {'peak memory':>12} {'first step':>11} {'step':>9}")
        for r in sorted(report.rows, key=lambda r: r["rank"]):
            lines.append(f"{r['rank']:>4}  {r['node']:<24} {r['device']:<8} {r['peak_memory_bytes'] / 2**20:>9.0f} MiB "
                         f"{r.get('first_step_s', 0) * 1000:>8.1f} ms {r.get('step_s', 0) * 1000:>6.1f} ms")
    lines += [f"[dtrain] preflight: {line}" for line in report.trackers]
    p = report.projection
    if p:
        lines.append(f"[dtrain] projected: {p['steps_per_epoch']} steps/epoch, {_duration(p['epoch_s'])}/epoch, "
                     f"{p['epochs']} epochs ({p['steps']} steps): {_duration(p['total_s'])} of training "
                     "(start-up not included)")
        lines.append(f"[dtrain] projected cost: {cost.describe(p['cost'])}")
    return lines


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def runs_dir_problem(job: DictConfig) -> str | None:
    """The driver's own check that runs_dir can hold run directories (as `dtrain train` claims one)."""
    path = Path(job.runs_dir).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"runs_dir: {path} lies under a file ({probe}); expected a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"runs_dir: {path} is not writable"
    return None
