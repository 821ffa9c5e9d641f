"""Mini-batch sharding across workers for in-memory tensor data sets.

Every epoch the training set is permuted (same seed on every rank), cut into *global* batches of
``batch_size x world_size`` samples, and each global batch is dealt round-robin to the ranks. So each sample is seen
once per epoch across all workers, every rank takes the same number of steps (no DDP hang on uneven data), and the
loop can weight each rank's loss by its share of the global batch, which makes N workers compute the same gradient
as one worker with the global batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Batch:
    """One rank's slice of a global batch: the tensors, how many samples the whole global batch has, and how many of
    this rank's rows are real (padding rows, only used to keep ranks in step during evaluation, come last)."""

    tensors: tuple[Tensor, ...]
    global_size: int
    real: int


def shard_indices(n: int, batch_size: int, rank: int, world: int, *, shuffle: bool, seed: int, epoch: int,
                  pad_eval: bool = False) -> list[tuple[Tensor, int, int]]:
    """(indices, global_size, real) for each of this rank's batches this epoch.

    Training (pad_eval=False): a last global batch smaller than the world size is topped up from the start of the
    permutation so that no rank gets an empty batch. Evaluation (pad_eval=True): no sample is repeated in the
    metrics; a rank whose slice is empty gets one padding row with real=0.
    """
    if shuffle:
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(n, generator=g)
    else:
        order = torch.arange(n)
    step = batch_size * world
    out = []
    for start in range(0, n, step):
        chunk = order[start:start + step]
        if len(chunk) < world and not pad_eval:
            chunk = torch.cat([chunk, order[: world - len(chunk)]])
        mine = chunk[rank::world]
        real = len(mine)
        if real == 0:
            mine = order[:1]
        out.append((mine, len(chunk), real))
    return out


class ShardedLoader:
    """Iterates this rank's batches of a tuple of same-length tensors (kept on the training device)."""

    def __init__(self, tensors: tuple[Tensor, ...], batch_size: int, rank: int, world: int, *, shuffle: bool,
                 seed: int = 0, eval_mode: bool = False) -> None:
        self.tensors, self.batch_size, self.rank, self.world = tensors, batch_size, rank, world
        self.shuffle, self.seed, self.eval_mode = shuffle, seed, eval_mode
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plan(self) -> list[tuple[Tensor, int, int]]:
        return shard_indices(len(self.tensors[0]), self.batch_size, self.rank, self.world, shuffle=self.shuffle,
                             seed=self.seed, epoch=self.epoch, pad_eval=self.eval_mode)

    def __len__(self) -> int:
        return len(range(0, len(self.tensors[0]), self.batch_size * self.world))

    def iter_from(self, skip: int = 0) -> Iterator[Batch]:
        """Batches of the current epoch, skipping the first `skip` (used when resuming mid-epoch)."""
        device = self.tensors[0].device
        plan = self.plan()[skip:]
        if not plan:
            return
        # One host-to-device copy of the epoch's indices: a blocking copy per batch would stall a GPU every step.
        indices = torch.cat([idx for idx, _, _ in plan]).to(device).split([len(idx) for idx, _, _ in plan])
        for idx, (_, global_size, real) in zip(indices, plan, strict=True):
            yield Batch(tuple(t.index_select(0, idx) for t in self.tensors), global_size, real)

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)
