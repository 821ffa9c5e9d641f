"""The in-memory Loader: tensors held on the training device, sharded across workers by global batch.

Every epoch the training set is permuted (the same seed on every rank) and cut into global batches (one per optimizer
step); each is cut into `accum` micro-batches, each dealt round-robin to the ranks. So each sample is seen once per
epoch across all workers, every rank takes the same number of steps (no DDP hang on uneven data), and the loop can
weight each rank's loss by its share of the step, which makes N workers compute the same gradient as one worker with
the global batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from dtrain.data.base import Batch, BatchPlan
from dtrain.errors import ConfigError


def batch_plan(descent: str, batch_size: int, n_train: int, world: int, accum: int,
               global_batch: int | None = None) -> BatchPlan:
    """The global batch of a gradient-descent variant: minibatch (batch_size per rank and micro-batch), batch (the
    whole training set per step) or stochastic (one sample per rank and micro-batch).

    global_batch: fixed whatever the world size (data.global_batch_size); each rank's share of a step is then cut
    into as many micro-batches of at most batch_size as it needs (at least accum)."""
    if global_batch is not None:
        share = math.ceil(global_batch / world)
        return BatchPlan(global_batch, max(accum, math.ceil(share / batch_size)), world)
    if descent == "batch":
        return BatchPlan(n_train, accum, world)
    per_rank = 1 if descent == "stochastic" else batch_size
    return BatchPlan(per_rank * world * accum, accum, world)


def dividing_worlds(global_batch: int, worlds: range) -> list[int]:
    """The world sizes of `worlds` that split global_batch evenly (every rank the same share of every step)."""
    return [w for w in worlds if global_batch % w == 0]


def check_global_batch(global_batch: int, worlds: range) -> None:
    """ConfigError unless global_batch has a sample for every rank of the largest world and some world size of
    `worlds` (the worker counts the run may have) splits it evenly."""
    many = f"{worlds[0]} workers" if len(worlds) == 1 else f"any of {worlds[0]}-{worlds[-1]} workers"
    if global_batch < worlds[-1]:
        raise ConfigError(f"data.global_batch_size: {global_batch} is smaller than {worlds[-1]} workers (every worker "
                          "needs a sample of each step)")
    if not dividing_worlds(global_batch, worlds):
        raise ConfigError(f"data.global_batch_size: {global_batch} cannot be split evenly among {many}; expected a "
                          "multiple of the worker count")


def step_plan(n: int, plan: BatchPlan, rank: int, *, shuffle: bool, seed: int,
              epoch: int) -> list[tuple[Tensor, int, bool]]:
    """(indices, step_samples, last) of each of this rank's training micro-batches in an epoch.

    A last micro-batch smaller than the world size is topped up from the start of the permutation so that no rank
    gets an empty batch.
    """
    order = _order(n, shuffle, seed, epoch)
    out = []
    for start in range(0, n, plan.global_batch):
        step = order[start:start + plan.global_batch]
        chunks = list(step.split(plan.micro_chunk))
        if len(chunks[-1]) < plan.world:
            chunks[-1] = torch.cat([chunks[-1], order[: plan.world - len(chunks[-1])]])
        samples = sum(len(c) for c in chunks)
        out += [(chunk[rank::plan.world], samples, i == len(chunks) - 1) for i, chunk in enumerate(chunks)]
    return out


def eval_plan(n: int, batch_size: int, rank: int, world: int) -> list[tuple[Tensor, int]]:
    """(indices, real) of each of this rank's evaluation batches: no sample is repeated in the metrics; a rank whose
    slice is empty gets one padding row with real=0."""
    order, out = torch.arange(n), []
    for start in range(0, n, batch_size * world):
        mine = order[start:start + batch_size * world][rank::world]
        out.append((mine, len(mine)) if len(mine) else (order[:1], 0))
    return out


def _order(n: int, shuffle: bool, seed: int, epoch: int) -> Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g)


def _gather(tensors: tuple[Tensor, ...], indices: list[Tensor]) -> Iterator[tuple[Tensor, ...]]:
    # One host-to-device copy of the epoch's indices: a blocking copy per batch would stall a GPU every step.
    device = tensors[0].device
    for idx in torch.cat(indices).to(device).split([len(i) for i in indices]):
        yield tuple(t.index_select(0, idx) for t in tensors)


class InMemoryLoader:
    """This rank's training micro-batches of a tuple of same-length tensors (kept on the training device)."""

    def __init__(self, tensors: tuple[Tensor, ...], plan: BatchPlan, rank: int, *, shuffle: bool = True,
                 seed: int = 0) -> None:
        self.tensors, self.plan, self.rank = tensors, plan, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.n = len(tensors[0])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.plan.global_batch)

    def iter_from(self, samples: int = 0) -> Iterator[Batch]:
        if samples % self.plan.global_batch and samples < self.n:
            raise ValueError(f"resume position {samples} is not at a step boundary of global batch "
                             f"{self.plan.global_batch}")
        plan = step_plan(self.n, self.plan, self.rank, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch)
        plan = plan[_micro_batches_before(plan, samples, self.plan.global_batch):]
        if not plan:
            return
        for tensors, (_, step_samples, last) in zip(_gather(self.tensors, [p[0] for p in plan]), plan, strict=True):
            yield Batch(tensors, len(tensors[0]), step_samples, last)


def _micro_batches_before(plan: list[tuple[Tensor, int, bool]], samples: int, global_batch: int) -> int:
    """How many of the epoch's micro-batches belong to the steps that trained its first `samples` samples."""
    steps = math.ceil(samples / global_batch)
    ends = [i + 1 for i, (_, _, last) in enumerate(plan) if last]
    return ends[steps - 1] if steps else 0


class EvalShards:
    """This rank's evaluation batches of a split's tensors: each sample counted once over all ranks."""

    def __init__(self, tensors: tuple[Tensor, ...], batch_size: int, rank: int, world: int) -> None:
        self.tensors, self.batch_size, self.rank, self.world = tensors, batch_size, rank, world

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __iter__(self) -> Iterator[Batch]:
        if not len(self):
            return
        plan = eval_plan(len(self), self.batch_size, self.rank, self.world)
        for tensors, (_, real) in zip(_gather(self.tensors, [p[0] for p in plan]), plan, strict=True):
            yield Batch(tensors, real, len(self))
