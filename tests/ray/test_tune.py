"""`dtrain tune`: Ray Tune searches whose trials are real Ray Train runs of the MLP on digits (tiny budgets)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dtrain.config import load_job, to_dict
from dtrain.errors import ConfigError
from dtrain.launch.spawn import LocalPublisher
from dtrain.launch.tune import BEST_FILE, RESULTS_FILE, plan_concurrency, run_search, stream_tasks
from dtrain.launch.worker import run_worker
from dtrain.tracking import read_metrics
from tests.helpers import ROOT, small_job


def _job(tmp_path, name: str, tune: dict, **over):
    base = small_job(**{"runs_dir": str(tmp_path), "name": name, "trainer.num_workers": 1, "model.hidden": "[16]",
                        "logging.progress": "false", "data.batch_size": 64, **over})
    base["tune"] = {"metric": "val/acc", "mode": "max", **tune}
    return load_job(None, base=base)


def test_asha_stops_bad_trials_early_and_best_yaml_trains(ray_session, tmp_path):
    # Grid order is deterministic and one trial runs at a time, so the good lr reaches ASHA's first rung first
    # and the hopeless lr (1e-6) is stopped there.
    job = _job(tmp_path, "asha", {"scheduler": "asha", "search_alg": "grid", "grace_period": 1,
                                  "reduction_factor": 2, "max_concurrent_trials": 1,
                                  "space": {"optim.lr": "choice([0.02, 0.000001])"}}, **{"trainer.max_epochs": 4})
    rows, cfg = run_search(job)
    assert [r["optim.lr"] for r in rows] == [0.02, 0.000001]  # sorted best first
    good, bad = rows
    assert good["status"] == bad["status"] == "ok"
    assert good["epochs"] == 4 and bad["epochs"] < 4, rows
    assert good["val/acc"] > bad["val/acc"]
    # The stopped trial's Train run was really aborted: it never reached its last epoch nor wrote a summary (each
    # report waits until Tune took the one before, so the run cannot train on to its end ahead of Tune's decision).
    bad_epochs = [e["epoch"] for e in read_metrics(bad["run_dir"]) if e["event"] == "epoch"]
    assert bad_epochs and max(bad_epochs) < 4
    assert not (tmp_path / "asha" / "trials" / bad["trial"] / "run0" / "summary.json").exists()
    csv = (tmp_path / "asha" / RESULTS_FILE).read_text().splitlines()
    assert csv[1].startswith(good["trial"]) and "test/acc" in csv[0].split(",")
    # The finished trial's test score is its run's (summary.json); the stopped one never reached the test split.
    ran = json.loads((Path(good["run_dir"]) / "summary.json").read_text())
    assert good["test/acc"] == ran["test"]["test/acc"] > 0.5 and good["test epoch"] == ran["evaluated"]["epoch"]
    assert math.isnan(bad["test/acc"])

    # best.yaml is a complete train spec: it loads, has no tune section, carries the best lr, and trains as is,
    # to the test score its trial reported.
    best = load_job(tmp_path / "asha" / BEST_FILE, ["name=best"])
    assert best.optim.lr == 0.02 and best.tune is None and list(best.model.hidden) == [16]
    summary = run_worker(to_dict(best), tmp_path / "best", LocalPublisher(tmp_path / "best"), torch.device("cpu"))
    assert summary["epochs"] == 4 and summary["test"]["test/acc"] == pytest.approx(good["test/acc"], abs=1e-6)

    # --resume on the finished search restores Tune's state and reproduces the same table.
    again, _ = run_search(job, resume=True)
    assert [(r["trial"], r["epochs"]) for r in again] == [(r["trial"], r["epochs"]) for r in rows]


# A search algorithm (optuna, list-valued choices) drawing two trials: tests/tracking/test_trackers_ray.py, whose
# search is also the MLflow nesting check. PBT's exploit, end to end, in a bucket: tests/ray/test_objstore.py.


def test_trials_that_cannot_fit_the_cluster_fail_before_starting(ray_session, tmp_path):
    space = {"space": {"optim.lr": "loguniform(1e-3, 1e-2)"}}
    with pytest.raises(ConfigError, match=r"^tune: a trial cannot fit the cluster: trainer\.num_workers: 8 workers"):
        run_search(_job(tmp_path, "big", space, **{"trainer.num_workers": 8}))
    assert not (tmp_path / "big").exists()
    with pytest.raises(ConfigError, match=r"^tune: a trial needs 5 CPUs \(tune\.trial_cpus 1 \+ 4 workers x 1 CPUs\), "
                                          r"the cluster has 4"):
        run_search(_job(tmp_path, "driver", {"trial_cpus": 1, **space}, **{"trainer.num_workers": 4}))
    # A searched worker count is planned at its largest value.
    with pytest.raises(ConfigError, match=r"^tune: a trial cannot fit the cluster: trainer\.num_workers: 6 workers"):
        run_search(_job(tmp_path, "searched", {"space": {"trainer.num_workers": "choice([1, 6])"}}))


def test_concurrency_is_capped_so_every_trial_gets_its_workers(ray_session, tmp_path):
    from dtrain.launch.search_space import read_tune_section

    cfg, _ = read_tune_section({"num_samples": 8, "max_concurrent_trials": 8, "trial_cpus": 0.5,
                                "space": {"optim.lr": "loguniform(1e-3, 1e-2)"}})
    limit, driver, note = plan_concurrency([small_job(**{"trainer.num_workers": 2})], cfg)
    assert limit == 1 and driver == {"CPU": 0.5}  # 4 CPUs / (0.5 + 2 x 1) = 1 trial at a time
    assert "lowered to 1" in note
    cfg.trial_cpus, cfg.max_concurrent_trials = 0, None
    limit, driver, _ = plan_concurrency([small_job(**{"trainer.num_workers": 2})], cfg)
    assert limit == 2 and driver["CPU"] == 0
    # Streamed trials' Ray Data tasks ask for what all the concurrent trials leave free, not what one trial's own
    # workers leave (2 trials x 2 workers hold all 4 CPUs: a task asking for 1 would wait for ever).
    assert stream_tasks([small_job(**{"trainer.num_workers": 2})], cfg, 2) == {"num_cpus": 0, "concurrency": 4}
    assert stream_tasks([small_job(**{"trainer.num_workers": 1})], cfg, 2) == {"num_cpus": 1}
    cfg.trial_cpus = 0.5  # 4 CPUs - (0.5 + 2 x 1.5): half a CPU each
    assert stream_tasks([small_job(**{"trainer.num_workers": 2, "trainer.cpus_per_worker": 1.5})], cfg, 1) == \
        {"num_cpus": 0.5}


def test_cli_tune_reports_bad_space_key(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: {name: mlp}\ntune:\n  metric: val/acc\n  space:\n    model.depth: randint(1, 4)\n")
    proc = subprocess.run([sys.executable, "-m", "dtrain", "tune", str(job), f"runs_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "dtrain: error: tune.space.model.depth: 1 does not fit the job: unknown key 'model.depth'")


def test_sigterm_stops_a_search_with_one_line_and_frees_its_trials_workers(ray_session, tmp_path):
    """What a scheduler sends: exit 143 with dtrain's line (not Ray's stack dump), and no trial's placement group
    is left holding CPUs afterwards (a later search would wait on them)."""
    import signal
    import time

    from ray.util import placement_group_table

    before = {pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"}
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtrain", "tune", str(ROOT / "jobs" / "tune_mlp_digits.yaml"), f"runs_dir={tmp_path}",
         "name=term", "tune.num_samples=1", "tune.scheduler=fifo", "trainer.max_epochs=200",
         "trainer.early_stopping.monitor=null", "logging.wandb.enabled=false", "--address", address],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not list(tmp_path.glob("term/trials/*/run0/checkpoint_*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "dtrain: terminated (SIGTERM)" in err and "SIGTERM received" not in err + out

    def left() -> set:
        return {pg for pg, info in placement_group_table().items() if info["state"] != "REMOVED"} - before

    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left(), placement_group_table()


def test_budget_ends_the_search_at_its_limit_and_results_carry_costs(ray_session, tmp_path, capsys):
    """`dtrain tune` with tune.budget.cpu_hours: the running trial is ended when the search's spend reaches the
    budget and no further trial starts; results.csv carries each trial's CPU-hours and cost, cost.json the total."""
    import csv
    import json

    from dtrain.cli import main
    from dtrain.launch.tune import COST_FILE

    # 25 s of one CPU: well under one trial of 2000 epochs (300 took 21.5 s on the fastest machine seen, 40 took
    # 10.4 s on a slower one), and well past a trial's start-up on a loaded one (a budget of 12 s was spent before a
    # slow machine's first epoch reported)
    budget = 25 / 3600
    job = tmp_path / "budget.yaml"
    job.write_text(f"""\
model: {{name: mlp, hidden: [16]}}
data: {{name: digits, batch_size: 64}}
trainer: {{num_workers: 1, max_epochs: 2000, log_every_n_steps: 1000}}
logging: {{wandb: {{enabled: "false"}}, progress: false}}
cost: {{per_cpu_hour: 2.0}}
tune: {{metric: val/acc, mode: max, search_alg: grid, max_concurrent_trials: 1,
       space: {{optim.lr: "choice([0.02, 0.01, 0.005])"}}, budget: {{cpu_hours: {budget}}}}}
""")
    assert main(["tune", str(job), f"runs_dir={tmp_path}", "name=budget"]) == 0
    out = capsys.readouterr().out
    assert "[dtrain] tune: budget reached (cpu_hours" in out, out[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "budget" / "results.csv")))
    ran = [r for r in rows if int(r["epochs"]) > 0]
    assert len(ran) == 1 and int(ran[0]["epochs"]) < 2000, rows  # ended at the limit; the others never trained
    assert float(ran[0]["cpu_hours"]) > 0 and float(ran[0]["cost"]) == pytest.approx(2 * float(ran[0]["cpu_hours"]))
    total = json.loads((tmp_path / "budget" / COST_FILE).read_text())
    assert total["cpu_hours"] == pytest.approx(sum(float(r["cpu_hours"]) for r in rows))
    # Stopped at the budget: the spend the trials reported reached it (counted from each trial's start, so never
    # under the real one), and the worker group's recorded lifetime is the budget give or take its start and end.
    reached = float(re.search(r"budget reached \(cpu_hours ([0-9.e-]+) of", out).group(1))
    assert reached >= budget and 0.7 * budget <= total["cpu_hours"] <= 1.3 * budget, (reached, total, budget)


def test_hyperopt_runs_a_real_two_trial_search(ray_session, tmp_path):
    """search_alg hyperopt, one trial at a time: the first trial is its random start, the second its TPE suggestion
    after the first result; each trial trains the values it drew (its config.yaml), inside the space."""
    job = _job(tmp_path, "hyperopt", {"search_alg": "hyperopt", "num_samples": 2, "max_concurrent_trials": 1,
                                      "seed": 5, "space": {"optim.lr": "loguniform(0.001, 0.05)",
                                                           "model.dropout": "choice([0.0, 0.2])"}},
               **{"trainer.max_epochs": 2})
    rows, _ = run_search(job)
    assert len(rows) == 2 and all(r["status"] == "ok" and r["epochs"] == 2 for r in rows), rows
    drawn = {(r["optim.lr"], r["model.dropout"]) for r in rows}
    assert len(drawn) == 2, rows
    for row in rows:
        assert 0.001 <= row["optim.lr"] <= 0.05 and row["model.dropout"] in (0.0, 0.2)
        ran = load_job(Path(row["run_dir"]) / "config.yaml")
        assert (ran.optim.lr, ran.model.dropout) == pytest.approx((row["optim.lr"], row["model.dropout"]))
        assert 0 < row["val/acc"] <= 1
