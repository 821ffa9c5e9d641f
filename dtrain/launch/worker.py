"""One training process, as every launcher starts it: builds data, model, strategy and tracker from the job and
runs the engine's loop (Ray Train workers and spawn_workers both call run_worker)."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtrain.config import to_objects
from dtrain.data import load_data
from dtrain.data.base import BatchPlan, DataBundle, Loaders
from dtrain.data.sharding import EvalShards, InMemoryLoader, batch_plan
from dtrain.data.streaming import StreamData, stream_loaders
from dtrain.engine import dist
from dtrain.engine.callbacks import Callback
from dtrain.engine.checkpoint import atomic_save
from dtrain.engine.loop import LoopConfig, Publish, RunContext, fit
from dtrain.engine.precision import Precision
from dtrain.engine.prepare import checkpoint_layers, compile_options
from dtrain.engine.profile import Profiler
from dtrain.engine.saving import Assemble
from dtrain.engine.strategies import Strategy, StrategySetup, build_strategy
from dtrain.launch.probe import check_probe, linear_probe
from dtrain.launch.sysmetrics import SystemMonitor
from dtrain.models import CatalogModel, build_model
from dtrain.storage import Mirror, RunStore
from dtrain.tracking import Tracker

MODEL_FILE = "model.pt"
"""In the run folder: the float32 weights (state dict) the run's test metrics were computed with."""


@dataclass
class Worker:
    """Everything one training process trains with, built from the job (see build_worker)."""

    model: CatalogModel
    loaders: Loaders
    strategy: Strategy
    loop: LoopConfig
    data: DataBundle | StreamData


def build_worker(job: Any, device: torch.device, data: DataBundle | StreamData | None = None) -> Worker:
    """Build this rank's model, loaders and strategy for job (JobConfig objects, see dtrain.config.to_objects).
    data: the job's data if the launcher loaded it already (else it is loaded here), or its streams."""
    rank, world, t = dist.rank(), dist.world_size(), job.trainer
    data = data if data is not None else load_data(job.data)  # seeded by data.seed: the same split everywhere
    if t.linear_probe:
        check_probe(data)
    n_train = data.n_train if isinstance(data, StreamData) else len(data.train[0])
    plan = batch_plan(job.optim.descent, job.data.batch_size, n_train, world, t.grad_accum,
                      job.data.global_batch_size)
    torch.manual_seed(t.seed)  # identical initial weights on every rank
    model = build_model(job.model, data.meta)
    torch.manual_seed(t.seed + 1 + rank)  # but independent dropout masks per rank
    setup = StrategySetup(device=device, precision=Precision(t.precision, device), optim=job.optim,
                          grad_clip=t.grad_clip, grad_clip_mode=t.grad_clip_mode, micro_batch=plan.micro_batch,
                          accum=plan.accum, compile=compile_options(t.compile),
                          activation_checkpointing=checkpoint_layers(t.activation_checkpointing))
    strategy = build_strategy(t.strategy, setup, getattr(t, t.strategy, None))
    loop = LoopConfig(lr=job.optim.lr, max_epochs=t.max_epochs, max_steps=t.max_steps,
                      log_every_n_steps=t.log_every_n_steps, max_nonfinite_steps=t.max_nonfinite_steps,
                      checkpoint_every_n_epochs=job.checkpoint.every_n_epochs,
                      checkpoint_every_n_steps=job.checkpoint.every_n_steps,
                      checkpoint_background=job.checkpoint.background,
                      collective_timeout_s=t.collective_timeout_s, early_stopping=t.early_stopping)
    if isinstance(data, StreamData):
        loaders = stream_loaders(data, plan, rank, device, t.seed)
    else:
        loaders = in_memory_loaders(data, plan, rank, device, t.seed)
    return Worker(model, loaders, strategy, loop, data)


def run_worker(job_dict: dict[str, Any], run_dir: str | Path, publish: Publish, device: torch.device,
               resume_dir: Path | None = None, data: DataBundle | StreamData | None = None, *, retarget: bool = False,
               callbacks: list[Callback] = (), store: RunStore | None = None,
               staging: Path | None = None, assemble: Assemble | None = None,
               publish_in_writer: bool = False) -> dict[str, Any]:
    """Train the job in this process (one rank of the process group, if any); returns the summary.
    data: the job's data if the launcher loaded it already (else it is loaded here).
    store: the run's folder in object storage, if it has one: run_dir is then rank 0's local staging folder.
    staging, assemble, publish_in_writer: where checkpoints are written, what the writer does with each once written,
    and whether it publishes it too (RunContext)."""
    job = to_objects(job_dict)
    worker = build_worker(job, device, data)
    rank = dist.rank()
    mirror = [Mirror(store, Path(run_dir))] if store is not None else []
    tracker = Tracker(run_dir, job_dict, after=mirror) if rank == 0 else None
    # instrumentation is installed as callbacks, only when configured: the loop has no branch for it
    system = job.logging.system_metrics
    monitor = SystemMonitor(system.interval_s) if system.enabled else None
    installed = [*callbacks, *([Profiler(job.trainer.profile, run_dir)] if job.trainer.profile.enabled else []),
                 *([monitor] if monitor else [])]
    probe = functools.partial(linear_probe, job.model, worker.data) if job.trainer.linear_probe else None
    ctx = RunContext(rank, dist.world_size(), publish, tracker.log if tracker else _ignore, resume_dir, retarget,
                     installed, export=functools.partial(_export, Path(run_dir), rank), probe=probe, staging=staging,
                     assemble=assemble, publish_in_writer=publish_in_writer)
    # the tracker marks its runs failed if fit raises; the monitor's thread stops either way
    with tracker or contextlib.nullcontext(), monitor or contextlib.nullcontext():
        return fit(worker.model, worker.loaders, worker.strategy, worker.loop, ctx)


def in_memory_loaders(data: DataBundle, plan: BatchPlan, rank: int, device: torch.device, seed: int) -> Loaders:
    """The training split dealt by global batch, val/test in shards, all held on device."""
    on = [tuple(t.to(device) for t in split) for split in (data.train, data.val, data.test)]
    return Loaders(InMemoryLoader(on[0], plan, rank, shuffle=True, seed=seed),
                   EvalShards(on[1], plan.micro_batch, rank, plan.world),
                   EvalShards(on[2], plan.micro_batch, rank, plan.world))


def _export(run_dir: Path, rank: int, weights: dict[str, torch.Tensor]) -> None:
    """Rank 0 writes the weights the run's test metrics are of: MODEL_FILE, a plain state dict of the model."""
    if rank == 0:
        atomic_save(weights, run_dir / MODEL_FILE)


def _ignore(record: dict[str, Any]) -> None:
    pass
