"""With a monitored metric the test metrics are those of the best epoch's weights, which the run also exports
(run_dir/model.pt), under every strategy that can put weights back; summary.json says which weights they are."""

from __future__ import annotations

import pytest
import torch

from dtrain.config import to_objects
from dtrain.data import load_data
from dtrain.engine.checkpoint import safe_load
from dtrain.launch.spawn import LocalPublisher, latest_checkpoint
from dtrain.launch.worker import MODEL_FILE, run_worker
from dtrain.models import build_model
from tests.helpers import small_job

# A learning rate high enough that validation accuracy goes up and down, so the best epoch is not the last one
# (asserted below, so the test cannot pass by evaluating the last weights).
JOB = dict(**{"optim.lr": 0.05, "optim.scheduler": "none", "optim.warmup_steps": 0, "trainer.max_epochs": 6,
              "trainer.early_stopping.monitor": "val/acc", "trainer.early_stopping.mode": "max",
              "trainer.early_stopping.patience": 6, "data.batch_size": 64})


def test_accuracy(job: dict, weights: dict[str, torch.Tensor]) -> float:
    cfg = to_objects(job)
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.meta)
    model.load_state_dict(weights)
    model.eval()
    with torch.no_grad():
        return float(model(data.test).metrics["acc"])


test_accuracy.__test__ = False  # a helper, not a test


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_test_metrics_are_the_best_epochs_and_that_is_what_is_exported(strategy, tmp_path, one_rank, one_thread):
    job = small_job(**JOB, **{"trainer.strategy": strategy, "trainer.num_workers": 1})
    summary = run_worker(job, tmp_path / "run", LocalPublisher(tmp_path / "run"), torch.device("cpu"))
    evaluated, best, last = summary["evaluated"], summary["best"], summary["final"]
    assert best["epoch"] < last["epoch"], "the job must have a best epoch before its last for this test to mean it"
    assert evaluated == {"weights": "best", "monitor": "val/acc", "val/acc": best["val/acc"], "epoch": best["epoch"],
                         "step": best["step"]}
    exported = torch.load(tmp_path / "run" / MODEL_FILE, weights_only=True)
    # the summary's test accuracy is that of the exported weights, recomputed here outside dtrain's loop
    assert summary["test"]["test/acc"] == pytest.approx(test_accuracy(job, exported), abs=1e-6)
    if strategy == "ddp":  # and not that of the last weights, which the last checkpoint holds
        last_weights = safe_load(latest_checkpoint(tmp_path / "run") / "model.pt")["model"]
        assert any(not torch.equal(last_weights[k], exported[k]) for k in exported)
        assert test_accuracy(job, last_weights) != pytest.approx(summary["test"]["test/acc"], abs=1e-6)


def test_without_a_monitor_the_last_weights_are_evaluated(tmp_path, one_rank, one_thread):
    job = small_job(**{"trainer.max_epochs": 2, "trainer.num_workers": 1})
    summary = run_worker(job, tmp_path / "run", LocalPublisher(tmp_path / "run"), torch.device("cpu"))
    assert summary["evaluated"] == {"weights": "last", "epoch": 2, "step": summary["steps"]}
