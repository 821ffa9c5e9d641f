"""The optimizer and its learning-rate schedule, from the job's optim section (OptimConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from dtrain.compat.torch import set_last_lr
from dtrain.errors import check

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "cosine", "step", "linear")
DESCENTS = ("minibatch", "batch", "stochastic")


@dataclass
class OptimConfig:
    name: str = "adam"
    """Optimizer: sgd, adam or adamw."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for adamw)."""
    momentum: float = 0.9
    """Momentum for sgd."""
    scheduler: str = "none"
    """Learning-rate schedule: none, cosine, step or linear (linear warm-up to lr, then linear decay)."""
    warmup_steps: int = 0
    """Steps of linear warm-up before the schedule."""
    step_size: int = 10
    """Epochs between decays for the step scheduler."""
    gamma: float = 0.5
    """Decay factor for the step scheduler."""
    descent: str = "minibatch"
    """Gradient-descent variant: minibatch (data.batch_size), batch (whole training set per step) or stochastic
    (one sample per worker per step)."""

    def __post_init__(self) -> None:
        check(self.name in OPTIMIZERS, "optim.name", "one of " + ", ".join(OPTIMIZERS), self.name)
        check(self.lr > 0, "optim.lr", "a number > 0", self.lr)
        check(self.weight_decay >= 0, "optim.weight_decay", "a number >= 0", self.weight_decay)
        check(0 <= self.momentum < 1, "optim.momentum", "a number in [0, 1)", self.momentum)
        check(self.step_size >= 1, "optim.step_size", "an integer >= 1", self.step_size)
        check(0 < self.gamma <= 1, "optim.gamma", "a number in (0, 1]", self.gamma)
        check(self.scheduler in SCHEDULERS, "optim.scheduler", "one of " + ", ".join(SCHEDULERS), self.scheduler)
        check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        check(self.descent in DESCENTS, "optim.descent", "one of " + ", ".join(DESCENTS), self.descent)



def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig, lr: float,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """sgd (with momentum), adam or adamw over params; fused=True picks torch's one-kernel implementation
    (CPU or CUDA), which can skip a step on the device (found_inf)."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step LambdaLR: linear warm-up, then none/cosine/step/linear decay."""
    warmup = cfg.warmup_steps
    decay_steps = max(1, total_steps - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / decay_steps)
        if cfg.scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * t))
        if cfg.scheduler == "linear":
            return max(0.0, 1 - t)
        if cfg.scheduler == "step":
            return cfg.gamma ** ((step - warmup) // max(1, cfg.step_size * steps_per_epoch))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant_schedule(cfg: OptimConfig) -> bool:
    """True when build_scheduler's factor is 1 at every step (no schedule, no warm-up): stepping it changes nothing."""
    return cfg.scheduler == "none" and cfg.warmup_steps == 0


def retarget(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg: OptimConfig,
             lr: float) -> None:
    """Give a restored optimizer and schedule new hyperparameters (lr, weight_decay, momentum) and keep the rest of
    their state: the moments, the step count, the schedule's current factor. Used when a run starts from another
    run's checkpoint with its own settings (PBT's exploit/explore in dtrain tune)."""
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        if base != lr:  # keep the schedule's current factor (and leave an unchanged rate bitwise as it is)
            group["lr"] = group["lr"] * lr / base if base else lr
        group["initial_lr"] = lr
        group["weight_decay"] = cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    set_last_lr(scheduler, [group["lr"] for group in optimizer.param_groups])


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
