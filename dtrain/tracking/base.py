"""What every sink of rank 0's Tracker shares: the Sink protocol and one mapping of dtrain events to tracker values.

Each record the loop logs has an 'event' key: stage, step, epoch, resume or end. Every tracker receives the same
values: step events -> their numbers at step=<global step> (train/<metric>, train/grad_norm, lr, samples_per_s,
step_time_s, epoch, sys/*, time/*); epoch events -> their numbers at step=<global step> with val/* as they are
and train/<metric> renamed train/<metric>_epoch (so the epoch mean does not overwrite the step value); the end
event -> the run's summary (test/*, best/*, steps, wall_time_s, train_samples_per_s, stop_reason, ...).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Protocol

SUMMARY_KEYS = ("steps", "wall_time_s", "train_samples_per_s", "stop_reason", "skipped_steps", "world_size")


class Sink(Protocol):
    """One destination of rank 0's record (metrics.jsonl, W&B, TensorBoard, MLflow)."""

    def log(self, record: dict[str, Any]) -> None:
        """Receive one event (the record metrics.jsonl holds, with its 'time')."""

    def finish(self, failed: bool) -> None:
        """Flush and close; failed: training raised."""


def clean(value: Any) -> Any:
    """Non-finite floats as strings (JSON has no NaN), recursively through dicts."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    return value


def numbers(record: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    """The numeric values of a record (bools and strings left out)."""
    return {k: v for k, v in record.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)}


def step_values(record: dict[str, Any]) -> tuple[int, dict[str, float]] | None:
    """(global step, values) a tracker logs for a step or epoch event; None for other events."""
    event, step = record.get("event"), record.get("step")
    if event == "step":
        return step, numbers(record, skip=("step", "time"))
    if event == "epoch":
        values = numbers(record, skip=("step", "time"))
        return step, {(f"{k}_epoch" if k.startswith("train/") else k): v for k, v in values.items()}
    return None


def summary_values(record: dict[str, Any]) -> dict[str, Any]:
    """The run summary of an end event: test metrics, best/<metric> of the best epoch, totals and stop reason."""
    summary: dict[str, Any] = dict(numbers(record.get("test") or {}))
    summary |= {f"best/{k}": v for k, v in (record.get("best") or {}).items() if isinstance(v, int | float | str)}
    return summary | {k: record[k] for k in SUMMARY_KEYS if k in record}


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': value} for a nested config (trackers that take flat parameters)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def latest_checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint folder of a run (Ray Train's <run_dir>/checkpoint_<time>, spawn's
    checkpoints/step_*), checked against its manifests; None if there is none."""
    from dtrain.engine.checkpoint import CheckpointError, pick_checkpoint, run_checkpoints

    try:
        return pick_checkpoint(run_checkpoints(run_dir), warn=False)
    except CheckpointError:
        return None


def final_checkpoint(run_dir: Path, record: dict[str, Any], tracker: str) -> tuple[Path, int | None] | None:
    """(folder, step) of the checkpoint to upload at the end event, with a note if it is not the final step."""
    from dtrain.engine.checkpoint import read_manifest

    folder = latest_checkpoint_dir(run_dir)
    if folder is None:
        print(f"[dtrain] {tracker}: no intact checkpoint to upload (checkpoint.every_n_epochs=0?)", flush=True)
        return None
    step = (read_manifest(folder, 0) or {}).get("step")
    step = step if isinstance(step, int) else None
    if step is not None and step != record.get("steps"):
        print(f"[dtrain] {tracker}: the latest checkpoint is from step {step}, training ended at step "
              f"{record.get('steps')}", flush=True)
    return folder, step


def kept_id(path: Path) -> str:
    """The id a sink keeps in the run dir (so that --resume and failure restarts continue the same run), or ''."""
    return path.read_text().strip() if path.is_file() else ""
