"""The driver's progress bar follows rank 0's metrics.jsonl: one bar per stage, counted from the stage's first step,
and a run that stops early ends with a full bar saying why."""

from __future__ import annotations

import json

from rich.console import Console

from dtrain.launch.progress import ProgressFollower
from dtrain.tracking import METRICS_FILE


def _follow(tmp_path, records: list[dict]) -> str:
    console = Console(record=True, width=150, force_terminal=False)
    follower = ProgressFollower(tmp_path, poll_s=0.01, console=console)
    follower.start()
    with open(tmp_path / METRICS_FILE, "a") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    follower.join(timeout=10)  # the end event finishes it
    assert not follower.is_alive()
    return console.export_text()


def test_bar_per_stage_counts_from_the_stage_start_and_ends_full_when_stopped_early(tmp_path):
    out = _follow(tmp_path, [
        {"event": "stage", "stage": "rbm0", "first_step": 0, "epochs": 2, "steps_per_epoch": 10},
        {"event": "epoch", "stage": "rbm0", "epoch": 2, "step": 20, "val/loss": 0.5},
        {"event": "stage", "stage": "finetune", "first_step": 20, "epochs": 30, "steps_per_epoch": 10},
        {"event": "step", "step": 25, "train/loss": 0.25},
        {"event": "epoch", "stage": "finetune", "epoch": 7, "step": 90, "val/loss": 0.125},
        {"event": "end", "stop_reason": "early stopping: val/loss did not improve for 5 epochs"},
    ])
    assert "rbm0" in out and "20/20" in out
    assert "finetune" in out and "70/70" in out and "/300" not in out
    assert "stopped: early stopping" in out


def test_completed_run_keeps_its_planned_total(tmp_path):
    out = _follow(tmp_path, [
        {"event": "stage", "stage": "train", "first_step": 0, "epochs": 3, "steps_per_epoch": 4},
        {"event": "epoch", "stage": "train", "epoch": 3, "step": 12, "val/acc": 0.5},
        {"event": "end", "stop_reason": "completed"},
    ])
    assert "12/12" in out and "stopped" not in out
