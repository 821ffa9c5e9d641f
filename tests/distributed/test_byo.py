"""The user project in examples/user_project trained by the engine's strategies without Ray (2 gloo ranks): a
CatalogModel by import path under DDP, and a plain nn.Module through the module adapter under DeepSpeed ZeRO-2 with
bf16 (resumed from its epoch-1 checkpoint) and ZeRO-3. The workers import the user's package themselves."""

from __future__ import annotations

import shutil

import pytest

from dtrain.config import load_job, to_dict
from dtrain.launch.spawn import spawn_workers
from dtrain.tracking import read_metrics
from tests.helpers import ROOT

pytestmark = pytest.mark.slow

PROJECT = ROOT / "examples/user_project"
QUIET = ["logging.progress=false", "logging.wandb.enabled=false", "trainer.log_every_n_steps=1"]


@pytest.fixture
def user_code(monkeypatch):
    """The user's project importable here, and so in the workers (they start with the caller's sys.path), as
    `dtrain train` makes it from the job file's folder."""
    monkeypatch.syspath_prepend(str(PROJECT))


def _job(file: str, *over: str) -> dict:
    return to_dict(load_job(PROJECT / "jobs" / file, [*QUIET, *over]))


def _epochs(run_dir) -> list[dict]:
    return [e for e in read_metrics(run_dir) if e["event"] == "epoch"]


def test_catalog_style_model_by_import_path_trains_under_ddp(user_code, tmp_path):
    job = _job("resnet_digits.yaml", "trainer.max_epochs=2")
    assert job["model"] == {"name": "mynets.resnet:TinyResNet", "channels": 16, "blocks": 2}
    summary = spawn_workers(job, tmp_path, world=2)
    assert summary["world_size"] == 2 and summary["skipped_steps"] == 0
    epochs = _epochs(tmp_path)
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    assert summary["test"]["test/acc"] > 0.9  # 10 classes: chance is 0.1


def test_plain_module_under_zero2_bf16_resumes_exactly(user_code, tmp_path):
    job = _job("smallnet_digits.yaml", "trainer.max_epochs=2", "trainer.strategy=deepspeed",
               "trainer.deepspeed.zero_stage=2", "trainer.precision=bf16-mixed")
    full = spawn_workers(job, tmp_path / "full", world=2)
    assert full["test"]["test/acc"] > 0.85
    steps = [e for e in read_metrics(tmp_path / "full") if e["event"] == "step"]
    first = sorted((tmp_path / "full" / "checkpoints").glob("step_*"))[0]  # the epoch-1 checkpoint
    shutil.copytree(first, tmp_path / "resumed" / "checkpoints" / first.name)
    resumed = spawn_workers(job, tmp_path / "resumed", world=2, resume=True)
    again = [e for e in read_metrics(tmp_path / "resumed") if e["event"] == "step"]
    n = int(first.name.removeprefix("step_"))
    assert [e["step"] for e in again] == [e["step"] for e in steps if e["step"] > n]
    assert [e["train/loss"] for e in again] == pytest.approx([e["train/loss"] for e in steps if e["step"] > n],
                                                             rel=1e-5)
    assert resumed["test"]["test/acc"] == pytest.approx(full["test"]["test/acc"], abs=1e-9)


def test_plain_module_trains_under_zero3(user_code, tmp_path):
    job = _job("smallnet_digits.yaml", "trainer.max_epochs=1", "trainer.strategy=deepspeed",
               "trainer.deepspeed.zero_stage=3")
    summary = spawn_workers(job, tmp_path, world=2)
    assert summary["test"]["test/acc"] > 0.7 and summary["skipped_steps"] == 0
