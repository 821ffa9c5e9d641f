"""Thin helpers over torch.distributed that also work in a single process without a process group."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum t across ranks (in place) and return it."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def mean_across_ranks(values: dict[str, Tensor]) -> dict[str, float]:
    """Average a dict of scalar tensors across ranks with one collective."""
    if not values:
        return {}
    keys = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in keys])
    all_reduce_sum(stacked)
    stacked /= world_size()
    return dict(zip(keys, stacked.tolist(), strict=True))
