"""What a distributed strategy provides to the loop, and how one is chosen from the config."""

from __future__ import annotations

from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn


@dataclass
class StepResult:
    """Outcome of one optimizer step: the total gradient norm before clipping and whether the step was skipped
    because the gradients were not finite (fp16 loss-scale overflows, which the scaler handles, do not count)."""

    grad_norm: Tensor
    skipped: bool


class Strategy(Protocol):
    """DDPStrategy and DeepSpeedStrategy implement this; the training loop only talks to it."""

    device: torch.device

    def setup(self, model: nn.Module, lr: float, total_steps: int, steps_per_epoch: int) -> nn.Module:
        """Wrap the model for distributed training and build its optimizer and LR schedule; returns the wrapper."""

    def autocast(self) -> ContextManager: ...

    def no_sync(self, enabled: bool) -> ContextManager:
        """Skip gradient all-reduce while accumulating micro-batches (enabled=True)."""

    def backward(self, loss: Tensor) -> None: ...

    def step(self) -> StepResult:
        """Unscale, measure and clip gradients, step optimizer and schedule unless non-finite, zero gradients."""

    def lr(self) -> float: ...

    def save(self, path: Path) -> None:
        """Write model, optimizer, schedule and scaler under path (a folder this rank owns; Ray merges ranks')."""

    def load(self, path: Path) -> None:
        """Restore what save wrote into the set-up model and optimizer."""

    def unwrapped(self) -> nn.Module:
        """The plain model with full weights (gathered on every rank if sharded)."""


def build_strategy(trainer_cfg: Any, optim_cfg: Any, device: torch.device) -> Strategy:
    """The strategy named by trainer.strategy."""
    if trainer_cfg.strategy == "deepspeed":
        from dtrain.engine.deepspeed import DeepSpeedStrategy  # imports deepspeed: only when asked for

        return DeepSpeedStrategy(trainer_cfg, optim_cfg, device)
    from dtrain.engine.ddp import DDPStrategy

    return DDPStrategy(trainer_cfg, optim_cfg, device)
