"""`dtrain report`: valid, non-blank PNGs and a report.md with the final metrics, from a run's metrics.jsonl."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from dtrain.cli import main
from dtrain.errors import DataError
from dtrain.report import _by_step, write_report
from dtrain.tracking import Tracker, read_metrics

PLOTS = ("loss", "metrics", "lr", "grad_norm")


def write_run(run_dir, finish: bool = True) -> dict:
    """A two-stage run's events through the real Tracker, with a crash and resume that re-logs steps 9-12."""
    with Tracker(run_dir, echo=False) as tracker:
        step = 0
        for stage, epochs in (("pretrain", 2), ("finetune", 3)):
            tracker.log({"event": "stage", "stage": stage, "epochs": epochs, "steps_per_epoch": 6})
            for epoch in range(1, epochs + 1):
                for _ in range(6):
                    step += 1
                    loss = 2.0 * math.exp(-step / 10)
                    tracker.log({"event": "step", "step": step, "epoch": epoch - 1 + _ / 6,
                                 "lr": 0.01 * (1 - step / 40), "samples_per_s": 1000.0, "step_time_s": 0.01,
                                 "train/loss": loss, "train/acc": 1 - loss / 2, "train/grad_norm": 1 / step})
                tracker.log({"event": "epoch", "stage": stage, "epoch": epoch, "step": step, "train/loss": loss,
                             "train/acc": 1 - loss / 2, "val/loss": loss * 1.1, "val/acc": 0.95 - loss / 2})
                if stage == "pretrain" and epoch == 2 and step == 12:
                    tracker.log({"event": "resume", "stage": 0, "epoch": 1, "batch": 0, "step": 6})
                    for s in range(7, 13):  # re-logged after the resume: these values must win
                        tracker.log({"event": "step", "step": s, "lr": 0.005, "train/loss": 0.5,
                                     "train/grad_norm": 0.1})
        end = {"test": {"test/loss": 0.123456, "test/acc": 0.9375}, "best": {"epoch": 3, "step": 30, "val/acc": 0.91,
               "monitor": "val/acc"}, "steps": step, "epochs": 0, "stop_reason": "completed", "wall_time_s": 12.5,
               "train_samples_per_s": 900.0, "world_size": 2}
        if finish:
            tracker.log({"event": "end", **end})
    return end


def assert_png(path) -> None:
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5, f"{path.name} is blank"  # axes, curves and text, not one flat colour


def test_report_writes_plots_and_final_metrics(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir)
    report = write_report(run_dir)
    assert report == run_dir / "report" / "report.md"
    for name in PLOTS:
        assert_png(report.parent / f"{name}.png")
    text = report.read_text()
    assert "| test/acc | 0.9375 |" in text and "| test/loss | 0.1235 |" in text
    assert "Best epoch (by val/acc)" in text and "completed" in text and "30 optimizer steps" in text
    assert all(f"![{name}]({name}.png)" in text for name in PLOTS)


def test_resumed_steps_keep_the_latest_values(tmp_path):
    write_run(tmp_path)
    steps = _by_step(read_metrics(tmp_path), "step")
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert all(r["train/loss"] == 0.5 for r in steps if 7 <= r["step"] <= 12)


def test_unfinished_run_and_custom_out_dir(tmp_path):
    write_run(tmp_path / "run", finish=False)
    report = write_report(tmp_path / "run", tmp_path / "elsewhere")
    assert report.parent == tmp_path / "elsewhere" and "did not finish" in report.read_text()
    assert_png(tmp_path / "elsewhere" / "loss.png")


def test_cli_report(tmp_path, capsys):
    write_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    assert str(tmp_path / "run" / "report" / "report.md") in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(DataError, match="metrics.jsonl"):
        write_report(tmp_path / "missing")
