"""What data looks like to the rest of dtrain: a source's raw arrays, the split tensors of the in-memory path, and
the Loader protocol the training loop iterates (in-memory shards today; a streaming source plugs in beside it)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import Tensor

from dtrain.models.base import DataMeta


@dataclass
class Arrays:
    """What a loader returns: features x, targets y (None when unsupervised), and optionally fixed splits."""

    x: np.ndarray
    y: np.ndarray | None
    task: str
    num_classes: int = 0
    split: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None
    """Predefined {"train": (x, y), "test": (x, y)} splits (e.g. MNIST); None splits x, y by fraction."""
    period: int | None = None
    shuffle_split: bool = True
    """False keeps the order (time series: test is the most recent data)."""


@dataclass
class DataBundle:
    """Train/val/test tensors (tuples of equal-length tensors) plus what a model needs to know."""

    train: tuple[Tensor, ...]
    val: tuple[Tensor, ...]
    test: tuple[Tensor, ...]
    meta: DataMeta


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is cut: into `accum` micro-batches, each dealt round-robin to `world`
    ranks. The global batch is the unit of the math: a rank's loss is weighted by its share of the step's samples,
    so the gradient is the mean over the global batch whatever the world size and accumulation."""

    global_batch: int
    accum: int = 1
    world: int = 1

    @property
    def micro_chunk(self) -> int:
        """Samples of one micro-batch over all ranks (the step's last micro-batch may have fewer)."""
        return math.ceil(self.global_batch / self.accum)

    @property
    def micro_batch(self) -> int:
        """The most samples one rank feeds forward at once."""
        return math.ceil(self.micro_chunk / self.world)


@dataclass
class Batch:
    """One rank's micro-batch: its tensors, how many of its rows are real samples (padding rows, only used to keep
    ranks in step during evaluation, come last), the samples of the whole optimizer step over all ranks and
    micro-batches, and whether it is the step's last micro-batch."""

    tensors: tuple[Tensor, ...]
    real: int
    step_samples: int
    last: bool = True


class Loader(Protocol):
    """This rank's training batches, epoch by epoch: what the loop iterates (see sharding.InMemoryLoader)."""

    plan: BatchPlan

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's order (seeded: the same on every rank, and again on a resume)."""

    def steps_per_epoch(self) -> int:
        """Optimizer steps in an epoch (the same on every rank)."""

    def iter_from(self, samples: int) -> Iterator[Batch]:
        """The epoch's micro-batches after the first `samples` samples (those of the steps already done)."""


class EvalLoader(Protocol):
    """This rank's share of an evaluation split: every sample counted once over all ranks, every rank in step."""

    def __len__(self) -> int:
        """Samples in the split (all ranks)."""

    def __iter__(self) -> Iterator[Batch]: ...


@dataclass
class Loaders:
    """What the training loop is given: the training loader and the evaluation splits."""

    train: Loader
    val: EvalLoader
    test: EvalLoader
