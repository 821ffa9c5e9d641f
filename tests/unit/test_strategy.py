"""DDPStrategy's step in one process: the learning rate follows the schedule step by step, and the fast total
gradient norm is torch's."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.config import to_objects
from dtrain.engine.precision import Precision
from dtrain.engine.strategies import StrategySetup
from dtrain.engine.strategies.ddp import DDPStrategy
from tests.helpers import small_job

pytestmark = pytest.mark.usefixtures("one_thread")


def _strategy(total_steps: int, **optim) -> tuple[DDPStrategy, torch.nn.Module]:
    job = to_objects(small_job(**{f"optim.{k}": v for k, v in optim.items()}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    cpu = torch.device("cpu")
    strategy = DDPStrategy(StrategySetup(cpu, Precision("32", cpu), job.optim))
    strategy.setup(model, job.optim.lr, total_steps, steps_per_epoch=5)
    return strategy, model


def _lrs(strategy: DDPStrategy, model: torch.nn.Module, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        loss = model(torch.randn(16, 4)).square().mean()
        strategy.backward(loss)
        strategy.step(loss.detach())
        lrs.append(strategy.lr())
    return lrs


def test_lr_follows_warmup_then_cosine_and_stays_constant_without_a_schedule():
    strategy, model = _strategy(10, lr=0.1, scheduler="cosine", warmup_steps=4)
    expected = [0.1 * (s + 1) / 4 if s < 4 else 0.1 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 6)) for s in range(1, 11)]
    assert _lrs(strategy, model, 10) == pytest.approx(expected, rel=1e-9)
    strategy, model = _strategy(10, lr=0.1)
    assert _lrs(strategy, model, 10) == [0.1] * 10


def test_total_gradient_norm_matches_torch():
    strategy, model = _strategy(10)
    strategy.backward(model(torch.randn(16, 4)).square().mean())
    want = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert strategy.step(torch.tensor(0.0)).grad_norm.item() == pytest.approx(want.item(), rel=1e-6)


def _trained(strategy_name: str, folder, **optim):
    """A strategy set up on the small MLP job, five steps trained, saved into folder."""
    from dtrain.launch.worker import build_worker

    over = {"trainer.strategy": strategy_name, "trainer.num_workers": 1, **{f"optim.{k}": v for k, v in optim.items()}}
    worker = build_worker(to_objects(small_job(**over)), torch.device("cpu"))
    strategy = worker.strategy
    wrapped = strategy.setup(worker.model, worker.loop.lr, 10, 5)
    for batch, _ in zip(worker.loaders.train.iter_from(0), range(5), strict=False):
        out = wrapped(batch.tensors)
        strategy.backward(out.loss)
        strategy.step(out.loss.detach())
    if folder is not None:
        strategy.snapshot(folder)()
    return strategy


@pytest.mark.parametrize("strategy_name", ["ddp", "deepspeed"])
def test_a_run_started_from_another_runs_checkpoint_takes_its_own_optimizer_settings(strategy_name, tmp_path,
                                                                                      one_rank):
    """PBT's exploit + explore: the weights and optimizer state of the better trial, this trial's hyperparameters,
    and the schedule's current factor kept."""
    donor = _trained(strategy_name, tmp_path, lr=0.01, scheduler="cosine")
    factor = donor.lr() / 0.01
    assert 0 < factor < 1  # five steps into the cosine decay
    taker = _trained(strategy_name, None, lr=0.002, weight_decay=0.1, scheduler="cosine")
    taker.load(tmp_path)
    taker.retarget(0.002)
    assert taker.lr() == pytest.approx(0.002 * factor, rel=1e-9)
    group = taker.optimizer.param_groups[0]
    assert group["weight_decay"] == 0.1 and taker.scheduler.base_lrs == [0.002]
    moments = [taker.optimizer.state[p]["exp_avg"] for p in group["params"]]
    donors = [donor.optimizer.state[p]["exp_avg"] for p in donor.optimizer.param_groups[0]["params"]]
    assert all(torch.equal(a, b) for a, b in zip(moments, donors, strict=True))  # the donor's optimizer state
