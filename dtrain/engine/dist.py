"""Thin helpers over torch.distributed that also work in a single process without a process group."""

from __future__ import annotations

import datetime
import time

import torch
import torch.distributed as dist
from torch import Tensor

from dtrain.compat.torch import default_store


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


def mean_across_ranks(values: dict[str, Tensor | float],
                      per_rank: dict[str, float] | None = None) -> dict[str, float]:
    """Average a dict of scalars (device tensors or host floats) across ranks with one collective.

    per_rank: host values every rank has under the same keys, returned for each rank as '<key>/rank<r>' by the same
    collective (each rank writes its slot of a zeroed vector; the sum holds everyone's). Host values travel to the
    device in one copy.
    """
    per_rank = per_rank or {}
    if not values and not per_rank:
        return {}
    on_device = sorted(k for k, v in values.items() if isinstance(v, Tensor))
    on_host, own, world, me = sorted(set(values) - set(on_device)), sorted(per_rank), world_size(), rank()
    host = torch.zeros(len(on_host) + world * len(own))
    host[:len(on_host)] = torch.tensor([float(values[k]) for k in on_host])
    start = len(on_host) + me * len(own)
    host[start:start + len(own)] = torch.tensor([float(per_rank[k]) for k in own])
    parts = [torch.stack([values[k].detach().float().reshape(()) for k in on_device])] if on_device else []
    device = parts[0].device if parts else torch.device("cpu")
    numbers = all_reduce_sum(torch.cat([*parts, host.to(device)])).tolist()
    means = dict(zip(on_device + on_host, (v / world for v in numbers), strict=False))
    gathered = numbers[len(on_device) + len(on_host):]
    return means | {f"{k}/rank{r}": gathered[r * len(own) + i] for r in range(world) for i, k in enumerate(own)}


def is_collective_timeout(err: BaseException) -> bool:
    """Whether err is a collective that gave up waiting for its peers (gloo's and NCCL's timeouts)."""
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


def absent_ranks(tag: str, wait_s: float = 3.0) -> list[int] | None:
    """After a collective timed out: the ranks that do not check in at the process group's store under tag within
    wait_s (the others that timed out too do). None when the store cannot tell (its host, rank 0, is gone too)."""
    try:
        store = default_store()
        store.set_timeout(datetime.timedelta(seconds=wait_s))
        store.set(f"dtrain/{tag}/{rank()}", "1")
        time.sleep(wait_s)
        return [r for r in range(world_size()) if not store.check([f"dtrain/{tag}/{r}"])]
    except Exception:  # noqa: BLE001 - whatever the store raises, the answer is "unknown"
        return None
