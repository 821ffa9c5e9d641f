"""Thin helpers over torch.distributed that also work in a single process without a process group."""

from __future__ import annotations

import datetime
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from dtrain.compat.torch import default_store
from dtrain.engine.stop import STOP_REQUESTED


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for alone)."""
    if is_dist():
        dist.barrier()


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
    """Whether err is a collective that gave up waiting for its peers: gloo's and NCCL's timeouts, or a TimeoutError
    a launcher raises for its own barriers."""
    text = str(err).lower()
    return isinstance(err, TimeoutError) or isinstance(err, RuntimeError) and ("timed out" in text or "timeout" in text)


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


class StepVote:
    """What every rank must learn at the same step boundary: whether some rank was asked to stop, and whether some
    rank's checkpoint write is still going. Each step boundary starts an asynchronous all-reduce (max) of this rank's
    two flags, on a gloo group of its own, and reads the one started at the previous boundary: the answer comes one
    step later and the loop never waits on it. One rank alone reads its own flags (no collective)."""

    def __init__(self, timeout_s: float) -> None:
        # its own timeout: a group's default is not the default group's but torch's 30 minutes
        self.group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
                      if world_size() > 1 else None)
        # Host memory that gloo reduces in place, read and written through numpy: the vote never touches a device
        # (and no tensor read-back is counted against the step, tests/unit/test_hot_path.py).
        self.host = np.zeros(2, dtype=np.float32)
        self.flags, self.work, self.sent_at = torch.from_numpy(self.host), None, -1
        self.stop = False
        """Some rank was asked to stop (it stays so)."""
        self.writing, self.as_of = False, -1
        """Whether some rank's checkpoint write was still going at step boundary as_of (-1: not known yet)."""

    def agree(self, step: int, writing: bool) -> None:
        """Called by every rank at every step boundary (step: the steps done), with whether its own checkpoint write
        is still going; updates stop, writing and as_of."""
        if self.group is None:
            self.stop, self.writing, self.as_of = self.stop or STOP_REQUESTED.is_set(), writing, step
            return
        if self.work is not None:
            self.work.wait()
            self.work = None
            stop, writing_somewhere = self.host
            self.stop, self.writing, self.as_of = self.stop or stop > 0, writing_somewhere > 0, self.sent_at
        self.host[:] = (float(STOP_REQUESTED.is_set()), float(writing))
        self.sent_at = step
        self.work = dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)

    def close(self) -> None:
        """Wait for the vote in flight (every rank started it) and release the group."""
        if self.work is not None:
            self.work.wait()
            self.work = None
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
