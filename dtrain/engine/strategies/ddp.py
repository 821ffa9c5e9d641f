"""PyTorch DistributedDataParallel with native mixed precision, gradient clipping and accumulation."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dtrain.compat.torch import step_unless
from dtrain.engine import dist
from dtrain.engine.checkpoint import atomic_save, safe_load, to_cpu
from dtrain.engine.optim import build_optimizer, build_scheduler, constant_schedule, retarget, trainable
from dtrain.engine.prepare import prepare_model
from dtrain.engine.strategies.base import StepResult, StrategySetup
from dtrain.engine.strategies.grads import all_finite, clip, nonfinite, same_device_and_dtype, total_norm
from dtrain.errors import ConfigError

MODEL_FILE = "model.pt"


class DDPStrategy:
    """DDP when world size > 1 (plain module otherwise); fp16 order: scale, backward, unscale, clip, step, update."""

    Options: ClassVar[type | None] = None

    def __init__(self, setup: StrategySetup, options: Any = None) -> None:
        self.cfg, self.device, self.precision = setup, setup.device, setup.precision
        self.model: nn.Module | None = None
        self.raw: nn.Module | None = None

    @classmethod
    def check(cls, options: Any, **trainer: Any) -> None:
        """DDP runs every precision, clipping mode and accumulation."""

    def setup(self, model: nn.Module, lr: float, total_steps: int, steps_per_epoch: int) -> nn.Module:
        self.raw = prepare_model(model.to(self.device), self.cfg.compile, self.cfg.activation_checkpointing)
        if dist.world_size() > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # broadcast_buffers=False: no model here keeps running statistics that must match across ranks, and
            # skipping the per-forward broadcast lets evaluation run through the same wrapper at no cost.
            # gradient_as_bucket_view: the all-reduced buckets become the gradients instead of being copied back
            # into them (one pass over every gradient less per step; benchmarks/ddp_flags.py measures it).
            with warnings.catch_warnings():  # torch deprecates the name but advises keeping it for this behaviour
                warnings.simplefilter("ignore", FutureWarning)
                self.model = DistributedDataParallel(self.raw, device_ids=ids, broadcast_buffers=False,
                                                     gradient_as_bucket_view=True)
        else:
            self.model = self.raw
        self.params = trainable(self.raw)
        # Fused (CPU and CUDA): one kernel per step instead of several per tensor, and it takes the skip decision
        # as a device tensor (found_inf): no host sync.
        self.optimizer = build_optimizer(self.params, self.cfg.optim, lr, fused=True)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, total_steps, steps_per_epoch)
        # A constant rate needs no schedule stepping (LambdaLR's step is host work every step).
        self.constant_lr = constant_schedule(self.cfg.optim)
        self.same_group = same_device_and_dtype(self.params)
        return self.model

    def autocast(self) -> ContextManager:
        return self.precision.autocast()

    def no_sync(self, enabled: bool) -> ContextManager:
        if enabled and isinstance(self.model, DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.precision.scaler.scale(loss).backward()

    def step(self, loss: Tensor) -> StepResult:
        scaler, optimizer = self.precision.scaler, self.optimizer
        scaler.unscale_(optimizer)
        norm = total_norm([p.grad for p in self.params if p.grad is not None], self.device, self.same_group)
        clip(self.params, self.cfg.grad_clip, self.cfg.grad_clip_mode, norm)
        if scaler.is_enabled():
            # fp16: the scaler finds overflowing gradients itself, skips the step and lowers the scale; that is
            # not a failure, but a loss that stays non-finite is.
            scaler.step(optimizer)
            scaler.update()
            skipped = nonfinite(loss)
        else:
            # The norm is of the all-reduced gradients, so every rank decides alike, on the device.
            skipped = nonfinite(norm)
            step_unless(optimizer, skipped)
        if not self.constant_lr:
            self.scheduler.step()  # the schedule follows the step count, skipped steps included
        optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def retarget(self, lr: float) -> None:
        retarget(self.optimizer, self.scheduler, self.cfg.optim, lr)

    def weights_finite(self) -> bool:
        # DDP replicas are identical: every rank reaches the same answer without a collective.
        return bool(all_finite(list(self.raw.parameters()), self.device))

    def snapshot(self, folder: Path) -> Callable[[], None]:
        if dist.rank() != 0:  # DDP replicas are identical: one copy is the checkpoint
            return lambda: None
        state = to_cpu({"model": self.raw.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict()})
        return lambda: atomic_save(state, folder / MODEL_FILE)

    def load(self, folder: Path) -> None:
        if not (folder / MODEL_FILE).is_file():
            raise ConfigError(f"{folder}: not a DDP checkpoint (no {MODEL_FILE}); resume it with the strategy that "
                              "wrote it")
        ckpt = safe_load(folder / MODEL_FILE)
        self.raw.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.precision.scaler.load_state_dict(ckpt["scaler"])

    def full_state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().cpu() for k, v in self.raw.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> bool:
        self.raw.load_state_dict(state)
        return True
