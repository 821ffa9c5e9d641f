"""Cost accounting (dtrain.launch.cost) and tune.budget's ledger (dtrain.launch.budget), without Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dtrain.launch.budget import TRIAL_KEYS, Ledger
from dtrain.launch.cost import COST_FILE, Segment, WorkerGroup, add_to_summary, price, run_cost

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_segments_add_up_to_worker_gpu_and_cpu_hours_and_money(tmp_path):
    with Segment(tmp_path, WorkerGroup(4, 2, 1)) as seg:  # a real segment: its start, then its measured end
        pass
    lines = [json.loads(line) for line in (tmp_path / COST_FILE).read_text().splitlines()]
    assert lines[0]["workers"] == 4 and lines[1]["seconds"] >= 0 and lines[1]["started"] == seg.started
    records = [  # as if: 30 min of 4 workers (2 CPUs, 1 GPU each); a resume of 15 min of 2 x 8 CPUs; then a
        # segment whose process was killed (no end line) 10 min after it started, when metrics.jsonl was last written
        {"started": 1, "workers": 4, "cpus_per_worker": 2, "gpus_per_worker": 1}, {"started": 1, "seconds": 1800},
        {"started": 2, "workers": 2, "cpus_per_worker": 8, "gpus_per_worker": 0}, {"started": 2, "seconds": 900},
        {"started": 1000, "workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}]
    (tmp_path / COST_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    os.utime(tmp_path / "metrics.jsonl", (1600, 1600))
    cost = run_cost(tmp_path, {"per_gpu_hour": 2.5, "per_cpu_hour": 0.1})
    assert cost["worker_hours"] == pytest.approx(4 * 0.5 + 2 * 0.25 + 1 / 6)
    assert cost["gpu_hours"] == pytest.approx(2.0) and cost["cpu_hours"] == pytest.approx(4 + 4 + 1 / 6)
    assert cost["cost"] == pytest.approx(2.0 * 2.5 + (8 + 1 / 6) * 0.1) and cost["segments"] == 3
    assert "cost" not in run_cost(tmp_path, {})  # no rates: hours only
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 3}))
    assert add_to_summary(tmp_path, cost)["cost"] == cost
    assert json.loads((tmp_path / "summary.json").read_text())["cost"]["segments"] == 3
    assert run_cost(tmp_path / "nothing") is None


def test_budget_ledger_stops_launching_when_the_next_trial_would_exceed():
    ledger = Ledger({"cpu_hours": 1.0})

    def result(cpu: float) -> dict:
        return {TRIAL_KEYS["cpu_hours"]: cpu, **price({"worker_hours": cpu, "cpu_hours": cpu, "gpu_hours": 0}, {})}

    assert ledger.next_would_exceed() is None  # nothing ended yet: nothing to estimate from
    ledger.record("a", result(0.3), ended=True)
    assert ledger.next_would_exceed() is None  # 0.3 spent + 0.3 for the next one
    ledger.record("b", result(0.1))  # running: counts as at least the costliest ended trial (0.3)
    assert ledger.next_would_exceed() is None  # 0.3 + 0.3 + next 0.3 = 0.9
    ledger.record("c", result(0.05))
    assert ledger.next_would_exceed() == "cpu_hours"  # 0.3 + 0.3 + 0.3 + next 0.3 > 1
    assert ledger.reached() is None
    ledger.record("b", result(0.7))
    assert ledger.reached() == "cpu_hours" and ledger.total("cpu_hours") == pytest.approx(1.05)


def test_dtrain_report_shows_the_runs_cost(tmp_path, capsys):
    from dtrain.cli import main

    (tmp_path / "config.yaml").write_text("name: r\nmodel: {name: mlp}\n"
                                          "cost: {per_gpu_hour: 3.0, per_cpu_hour: null}\n")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"event": "epoch", "epoch": 1, "step": 5, "time": 1.0,
                                                        "val/loss": 0.5}) + "\n")
    (tmp_path / COST_FILE).write_text(json.dumps({"started": 0, "workers": 2, "cpus_per_worker": 4,
                                                  "gpus_per_worker": 1}) + "\n"
                                      + json.dumps({"started": 0, "seconds": 7200}) + "\n")
    assert main(["report", str(tmp_path)]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Cost" in text and "| GPU-hours | 4.0000 |" in text and "| CPU-hours | 16.0000 |" in text
    assert "| cost | 12.0000 |" in text


def test_preflight_projects_background_checkpoint_work_onto_the_steps_only_where_no_core_is_spare():
    """Two ranks on one node with 2 cores: each rank's 0.1 s of background checkpoint work shares the cores with the
    steps (epoch = 10 x 0.02 + 0.05 + 0.1); on 4 cores it has cores of its own; every 2 epochs it counts half."""
    from dtrain.config import load_job
    from dtrain.launch.preflight import project

    def projected(cores: int, *overrides: str) -> float:
        job = load_job(JOBS / "mlp_digits.yaml", list(overrides))
        rows = [{"rank": r, "node": "a", "device": "cpu", "steps_per_epoch": 10, "step_s": 0.02, "epoch_end_s": 0.05,
                 "cores": cores, "checkpoint_background_s": 0.1} for r in range(2)]
        return project(job, rows, WorkerGroup(2, 1.0, 0.0))["epoch_s"]

    assert projected(2) == pytest.approx(0.35)
    assert projected(3) == pytest.approx(0.30)
    assert projected(4) == pytest.approx(0.25)
    assert projected(2, "checkpoint.every_n_epochs=2") == pytest.approx(0.30)
    assert projected(2, "checkpoint.every_n_epochs=0") == pytest.approx(0.25)
