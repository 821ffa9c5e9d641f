"""Optimizer and learning-rate schedule from the optim config."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def build_optimizer(params: Any, cfg: Any, lr: float, fused: bool | None = None) -> torch.optim.Optimizer:
    """sgd (with momentum), adam or adamw over params; fused=True picks torch's one-kernel implementation
    (CPU or CUDA), which can skip a step on the device (found_inf)."""
    params = [p for p in params if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int,
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


def constant_schedule(cfg: Any) -> bool:
    """True when build_scheduler's factor is 1 at every step (no schedule, no warm-up): stepping it changes nothing."""
    return cfg.scheduler == "none" and cfg.warmup_steps == 0


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
