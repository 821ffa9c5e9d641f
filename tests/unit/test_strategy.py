"""DDPStrategy's step in one process: the learning rate follows the schedule step by step, and the fast total
gradient norm is torch's."""

from __future__ import annotations

import math

import pytest
import torch

from dtrain.config import to_objects
from dtrain.engine.ddp import DDPStrategy
from tests.helpers import small_job

pytestmark = pytest.mark.usefixtures("one_thread")


def _strategy(total_steps: int, **optim) -> tuple[DDPStrategy, torch.nn.Module]:
    job = to_objects(small_job(**{f"optim.{k}": v for k, v in optim.items()}))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    strategy = DDPStrategy(job.trainer, job.optim, torch.device("cpu"))
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
