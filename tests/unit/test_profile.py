"""trainer.profile: torch.profiler traces of the chosen steps on the chosen ranks, the report's operator table,
and one-line errors for ranges that cannot work."""

from __future__ import annotations

import json

import pytest

from dtrain.cli import main
from dtrain.launch.spawn import spawn_workers
from dtrain.report import write_report
from dtrain.tracking import read_metrics
from tests.helpers import JOBS, small_job


def test_profiles_only_the_chosen_rank_and_report_lists_operators(tmp_path, capfd):
    job = small_job(**{"trainer.max_epochs": 1, "trainer.profile.enabled": "true", "trainer.profile.ranks": "[1]",
                       "trainer.profile.wait": 2, "trainer.profile.warmup": 1, "trainer.profile.active": 2})
    spawn_workers(job, tmp_path, world=2)
    folder = tmp_path / "profile"
    assert sorted(p.name for p in folder.iterdir()) == ["rank1.ops.json", "rank1.pt.trace.json"]
    trace = json.loads((folder / "rank1.pt.trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    steps = sorted(n for n in names if str(n).startswith("ProfilerStep#"))
    assert steps == ["ProfilerStep#3", "ProfilerStep#4"], "wait 2 + warmup 1, then 2 recorded steps"
    assert {"aten::addmm", "c10d::allreduce_"} <= names, "forward matmuls and DDP's gradient all-reduce"
    ops = json.loads((folder / "rank1.ops.json").read_text())
    assert ops["steps"] == 2 and ops["ops"][0]["self_cpu_us"] >= ops["ops"][-1]["self_cpu_us"] > 0
    report = write_report(tmp_path).read_text()
    assert "## Profile: top operators by self time (rank 1, 2 steps)" in report
    assert f"| `{ops['ops'][0]['name']}` | {ops['ops'][0]['calls']} |" in report
    assert capfd.readouterr().out.count("[dtrain] profiler: rank 1 trace written") == 1
    step = next(e for e in read_metrics(tmp_path) if e["event"] == "step")
    assert "time/data_s" in step and not any(k.startswith("sys/") for k in step), "system metrics are opt-in"


@pytest.mark.parametrize("over, message", [
    (["trainer.profile.ranks=[2]"], "trainer.profile.ranks: expected ranks below trainer.num_workers (2), got [2]"),
    (["trainer.max_steps=4"], "trainer.profile: expected wait + warmup + active <= trainer.max_steps (4), got 5"),
    (["trainer.profile.active=0"], "trainer.profile.active: expected an integer >= 1, got 0"),
    (["trainer.profile.wait=-1"], "trainer.profile.wait: expected an integer >= 0, got -1"),
])
def test_profile_ranges_that_cannot_work_are_one_line(tmp_path, capsys, over, message):
    code = main(["train", str(JOBS / "mlp_digits.yaml"), f"runs_dir={tmp_path}", "trainer.profile.enabled=true",
                 *over])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].endswith(message), err
