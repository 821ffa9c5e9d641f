"""Builds data, model and strategy inside one training process and runs the loop (called by every launcher)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from dtrain.config import to_objects
from dtrain.data import load_data
from dtrain.data.base import DataBundle
from dtrain.engine import dist
from dtrain.engine.loop import Report, RunContext, fit
from dtrain.engine.strategy import build_strategy
from dtrain.models import build_model


def run_worker(job_dict: dict[str, Any], run_dir: str | Path, report: Report, device: torch.device,
               resume_dir: Path | None = None, data: DataBundle | None = None) -> dict[str, Any]:
    """Train the job in this process (one rank of the process group, if any); returns the summary.
    data: the job's data if the launcher loaded it already (else it is loaded here)."""
    from dtrain.tracking import Tracker

    job = to_objects(job_dict)
    rank, world = dist.rank(), dist.world_size()
    data = data if data is not None else load_data(job.data)  # seeded by data.seed: the same split everywhere
    torch.manual_seed(job.trainer.seed)  # identical initial weights on every rank
    model = build_model(job.model, data.meta)
    torch.manual_seed(job.trainer.seed + 1 + rank)  # but independent dropout masks per rank
    strategy = build_strategy(job.trainer, job.optim, device)
    tracker = Tracker(run_dir, job_dict) if rank == 0 else None
    ctx = RunContext(rank, world, report, tracker.log if tracker else _ignore, resume_dir)
    with tracker or contextlib.nullcontext():  # the tracker marks its W&B run failed if fit raises
        return fit(job, model, data, strategy, ctx)


def _ignore(record: dict[str, Any]) -> None:
    pass
