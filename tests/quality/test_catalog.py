"""The catalog table's figures hold: every row's shipped job file, trained unchanged with its own worker count (2
spawned gloo workers: the engine `dtrain train` runs, without Ray's start-up), reaches the figures that
`make catalog` recorded in benchmarks/results/catalog.json (and the README shows) within the row's tolerance, and
stays ahead of its peer's recorded figure where the table says it is ahead."""

from __future__ import annotations

import json

import pytest

from benchmarks.catalog import BY_JOB, RESULT, ROWS, Run, bar, within
from dtrain.config import load_job, to_dict, to_objects
from dtrain.data import load_data
from dtrain.launch.spawn import spawn_workers
from tests.helpers import JOBS

pytestmark = pytest.mark.slow
RECORDED = json.loads(RESULT.read_text())["rows"]


@pytest.mark.parametrize("job_file", [row.job for row in ROWS])
def test_the_shipped_job_reaches_its_catalog_figures(job_file, tmp_path):
    row, recorded = BY_JOB[job_file], RECORDED[job_file]
    job = load_job(JOBS / job_file, [f"runs_dir={tmp_path}", "name=q", "logging.progress=false",
                                     "logging.wandb.enabled=false"])
    summary = spawn_workers(to_dict(job), tmp_path / "q", world=job.trainer.num_workers)
    assert summary["world_size"] == recorded["workers"] and summary["epochs"] == recorded["epochs"]
    cfg = to_objects(job)
    figures = row.measure(Run(tmp_path / "q", summary, cfg, load_data(cfg.data)))
    print(f"{job_file}: {figures}, recorded {recorded['figures']}, peer {recorded['peer']}")
    for name, value in recorded["figures"].items():
        assert within(row.tolerance[name], figures[name], value), (name, figures[name], value)
    if recorded["verdict"] == "ahead":  # of its peer's recorded figure, or its target
        main = next(iter(recorded["figures"]))
        ours, against = figures[main], bar(row, recorded["peer"], main)
        assert ours >= against if row.better == "max" else ours <= against, (main, ours, against)
