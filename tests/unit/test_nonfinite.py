"""Non-finite loss or gradients: the step is skipped and counted; K in a row stop the run with a clear message;
non-finite weights are never checkpointed."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dtrain.config import to_objects
from dtrain.data import load_data
from dtrain.data.base import BatchPlan
from dtrain.data.sharding import step_plan
from dtrain.engine.checkpoint import checkpoint_problem, safe_load
from dtrain.engine.loop import RunContext, fit
from dtrain.engine.metrics import MetricSums, NonFiniteGuard
from dtrain.engine.saving import CheckpointWriter
from dtrain.engine.state import TrainState
from dtrain.errors import TrainingError
from dtrain.launch.spawn import LocalPublisher, latest_checkpoint
from dtrain.launch.worker import build_worker
from tests.helpers import small_job

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(run_dir, poison=None, scale=1.0, **over):
    """Train in this process (one rank, no process group); poison: training rows set to NaN; scale: of all x."""
    job = to_objects(small_job(**over))
    data = load_data(job.data)
    if poison is not None:
        x = data.train[0].clone()
        x[poison] = float("nan")
        data = dataclasses.replace(data, train=(x, *data.train[1:]))
    data = dataclasses.replace(data, train=(data.train[0] * scale, *data.train[1:]))
    worker = build_worker(job, torch.device("cpu"), data)
    events = []
    ctx = RunContext(0, 1, LocalPublisher(run_dir), events.append)
    train = lambda: fit(worker.model, worker.loaders, worker.strategy, worker.loop, ctx)  # noqa: E731
    return job, data, worker, ctx, train, events


def test_nan_samples_skip_exactly_their_steps_and_training_goes_on(tmp_path):
    poison = torch.tensor([3, 400, 1000])
    job, data, _, ctx, train, events = _run(tmp_path, poison, **{"trainer.max_epochs": 3, "optim.lr": 0.01})
    summary = train()
    n, bs = len(data.train[0]), job.data.batch_size
    # The batches of each epoch that hold a poisoned row: exactly the steps that must be skipped.
    expected = sum(bool(torch.isin(idx, poison).any()) for epoch in range(3)
                   for idx, _, _ in step_plan(n, BatchPlan(bs), 0, shuffle=True, seed=job.trainer.seed, epoch=epoch))
    assert expected >= 3
    assert summary["skipped_steps"] == expected
    assert summary["stop_reason"] == "completed" and summary["steps"] == 3 * len(range(0, n, bs))
    assert summary["test"]["test/acc"] > 0.85  # the other steps trained normally
    weights = safe_load(latest_checkpoint(tmp_path) / "model.pt")["model"]
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    assert [e for e in events if e.get("event") == "end"][0]["skipped_steps"] == expected


def test_k_nonfinite_steps_in_a_row_stop_the_run_with_a_clear_message(tmp_path):
    # Adam's first step moves every weight by ~lr: finite (1e30 < float32 max), but every later loss overflows.
    *_, train, events = _run(tmp_path, **{"optim.lr": 1e30, "trainer.max_nonfinite_steps": 4})
    with pytest.raises(TrainingError, match=r"^training stopped: 4 consecutive steps had a non-finite loss or "
                                            r"gradient \(step 5\); lower optim.lr or set trainer.grad_clip$"):
        train()
    assert not (tmp_path / "checkpoints").exists()  # stopped mid-epoch, before any checkpoint


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    # Inputs x1000 give first-layer gradients of several units (finite loss, finite norm): SGD at lr=1e38 then moves
    # those weights past float32's largest value (3.4e38), so the weights are inf after a step that was not skipped.
    *_, train, _ = _run(tmp_path, scale=1e3, **{"optim.name": "sgd", "optim.lr": 1e38, "checkpoint.every_n_steps": 1})
    with pytest.raises(TrainingError, match="the weights became non-finite; the last good checkpoint is kept"):
        train()
    assert not (tmp_path / "checkpoints").exists()


def test_report_refuses_nonfinite_weights_and_keeps_the_last_good_checkpoint(tmp_path):
    job, _, worker, ctx, train, _ = _run(tmp_path, **{"trainer.max_epochs": 1})
    train()
    good = latest_checkpoint(tmp_path)
    with torch.no_grad():
        next(worker.model.parameters())[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="non-finite"):
        CheckpointWriter(0, 1, ctx.publish).start(worker.strategy, TrainState(epoch=1, step=999), {"step": 999})
    assert latest_checkpoint(tmp_path) == good and checkpoint_problem(good) is None
    assert not list((tmp_path / "checkpoints").glob("*999*"))


def test_guard_counts_runs_across_read_backs_and_a_full_buffer():
    state = TrainState()
    guard = NonFiniteGuard(state, limit=4, capacity=3)
    # Steps 1-9: a run of 3 (steps 2-4) ends before the limit; the run from step 7 reaches 4 at step 10.
    flags = [0, 1, 1, 1, 0, 0, 1, 1, 1, 1]
    with pytest.raises(TrainingError, match=r"4 consecutive steps .* \(step 10\)"):
        for i, flag in enumerate(flags):
            guard.add(torch.tensor(float(flag)))  # the buffer fills every 3 steps and is read back then
            state.step += 1
            if state.step == 5:
                guard.check()  # a logged step between the two runs
        guard.check()
    assert state.skipped_steps == 7 and i == len(flags) - 1


def test_metric_sums_are_exact_sample_weighted_means_across_folds():
    """MetricSums keeps batches' metrics and sums them in folds (every `capacity` batches, one per distinct weight);
    the result must be the exact sample-weighted mean, and kept tensors must not hold autograd graphs."""
    rows = [(1.0, 0.5, 4), (2.0, 1.0, 4), (3.0, 0.0, 4), (4.0, 1.0, 2), (5.0, 0.25, 4), (6.0, 0.75, 3)]
    sums = MetricSums(capacity=4)  # folds after the 4th batch and at reduce: weights 4 and 2, then 4 and 3
    w = torch.ones((), requires_grad=True)
    for loss, acc, n in rows:
        sums.add({"loss": torch.tensor(loss) * w, "acc": torch.tensor(acc)}, n)  # loss carries a graph
    assert not any(t.requires_grad for kept in sums.pending.values() for t in kept)
    got = sums.reduce("train")
    total = sum(n for *_, n in rows)
    assert got["train/loss"] == pytest.approx(sum(v * n for v, _, n in rows) / total, rel=1e-6)
    assert got["train/acc"] == pytest.approx(sum(a * n for _, a, n in rows) / total, rel=1e-6)
    assert not sums.totals.requires_grad and MetricSums().reduce("val") == {}
