"""What a run costs: worker-hours split into CPU-hours and GPU-hours, and money when the job prices them.

The driver measures each segment of a run (one `fit_job`: the worker group from the start of its placement to its
release, Ray Train's restarts after failures included) and appends it to the run dir's cost.jsonl, so that
`--resume` and dtrain tune's trial segments add up. summary.json carries the totals under "cost". A run folder is a
local path or a RunStore (object storage), where the small files are read and written whole.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtrain.storage import RunStore, read_text, write_text
from dtrain.tracking import METRICS_FILE, SUMMARY_FILE

COST_FILE = "cost.jsonl"


@dataclass
class WorkerGroup:
    """The resources a run's worker group holds while it lives."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float

    def hours(self, seconds: float) -> dict[str, float]:
        """Worker-, CPU- and GPU-hours of holding this group for seconds."""
        worker_hours = self.workers * seconds / 3600
        return {"worker_hours": worker_hours, "cpu_hours": worker_hours * self.cpus_per_worker,
                "gpu_hours": worker_hours * self.gpus_per_worker}


def price(hours: dict[str, float], rates: dict[str, Any] | None) -> dict[str, float]:
    """hours plus 'cost' (money) when the job's cost section sets a rate; rates: {per_gpu_hour, per_cpu_hour}."""
    rates = rates or {}
    if rates.get("per_gpu_hour") is None and rates.get("per_cpu_hour") is None:
        return dict(hours)
    money = (hours["gpu_hours"] * (rates.get("per_gpu_hour") or 0)
             + hours["cpu_hours"] * (rates.get("per_cpu_hour") or 0))
    return {**hours, "cost": money}


class Segment:
    """Context manager around one fit: appends the segment's start (its worker group) to run_dir/cost.jsonl, and
    its measured lifetime on exit (also when the run fails or is interrupted: the resources were held all the
    same). A process killed before its exit (a search trial Tune ends) leaves the start alone: run_cost then ends
    the segment at the run's last sign of life, rank 0's last write to metrics.jsonl."""

    def __init__(self, run_dir: Path | RunStore, group: WorkerGroup) -> None:
        self.run_dir, self.group = run_dir, group

    def __enter__(self) -> Segment:
        self.started = time.time()
        self._append({"started": self.started, "workers": self.group.workers,
                      "cpus_per_worker": self.group.cpus_per_worker, "gpus_per_worker": self.group.gpus_per_worker})
        return self

    def __exit__(self, *exc: object) -> None:
        ended = time.time()
        self._append({"started": self.started, "ended": ended, "seconds": ended - self.started})

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record) + "\n"
        if isinstance(self.run_dir, RunStore):  # objects are written whole
            write_text(self.run_dir, COST_FILE, (read_text(self.run_dir, COST_FILE) or "") + line)
        elif self.run_dir.is_dir():
            with open(self.run_dir / COST_FILE, "a") as f:
                f.write(line)


def _mtime(run_dir: str | Path | RunStore, name: str) -> float:
    """When the run folder's file name was last written (seconds since the epoch); 0 if there is none."""
    if isinstance(run_dir, RunStore):
        return run_dir.mtime(name) or 0.0
    path = Path(run_dir) / name
    return path.stat().st_mtime if path.is_file() else 0.0


def run_cost(run_dir: str | Path | RunStore, rates: dict[str, Any] | None = None) -> dict[str, float] | None:
    """The run's totals over every recorded segment (None when none was recorded): worker/CPU/GPU-hours, the
    seconds the worker groups lived, segments, and cost when rates are set."""
    text = read_text(run_dir, COST_FILE)
    if text is None:
        return None
    starts: dict[float, dict[str, Any]] = {}
    ends: dict[float, float] = {}
    for line in text.splitlines():
        record = json.loads(line) if line.strip() else {}
        if "seconds" in record:
            ends[record["started"]] = record["seconds"]
        elif "workers" in record:
            starts[record["started"]] = record
    last_seen = _mtime(run_dir, METRICS_FILE)
    totals = {"worker_hours": 0.0, "cpu_hours": 0.0, "gpu_hours": 0.0}
    seconds = 0.0
    for started, seg in starts.items():
        held = ends.get(started, max(0.0, last_seen - started))
        group = WorkerGroup(seg["workers"], seg["cpus_per_worker"], seg["gpus_per_worker"])
        for key, value in group.hours(held).items():
            totals[key] += value
        seconds += held
    return {**price(totals, rates), "seconds": seconds, "segments": len(starts)}


def add_to_summary(run_dir: Path | RunStore, cost: dict[str, float] | None) -> dict[str, Any]:
    """Write cost into the run's summary.json (under "cost") when both exist; returns the summary."""
    text = read_text(run_dir, SUMMARY_FILE)
    if text is None:
        return {}
    summary = json.loads(text)
    if cost is not None:
        summary["cost"] = cost
        write_text(run_dir, SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


def sum_costs(costs: list[dict[str, float] | None]) -> dict[str, float]:
    """Totals of several runs' costs (a trial's segments, a search's trials); missing ones count as zero."""
    keys = ("worker_hours", "cpu_hours", "gpu_hours", "cost")
    present = [c for c in costs if c]
    total = {k: sum(c.get(k, 0.0) for c in present) for k in keys if any(k in c for c in present) or k != "cost"}
    return {k: v for k, v in total.items() if math.isfinite(v)}


def describe(cost: dict[str, float]) -> str:
    """One line: '0.0123 GPU-hours, 0.456 CPU-hours (1.2 worker-hours), cost 3.21'."""
    text = (f"{cost['gpu_hours']:.4g} GPU-hours, {cost['cpu_hours']:.4g} CPU-hours "
            f"({cost['worker_hours']:.4g} worker-hours)")
    return text + (f", cost {cost['cost']:.4g}" if "cost" in cost else "")
