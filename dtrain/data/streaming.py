"""The streaming Loader: this rank's share of a data set that arrives as a stream of numpy batches ({"x", "y"}),
never held whole (data.name=parquet, read by Ray Data; this module knows nothing of Ray: the launcher hands it a
function that starts one epoch of this rank's stream).

Every rank streams the same number of rows per epoch (the launcher splits the data so: Ray Data's equal split), so
the step layout follows from the row count the driver took: each step takes `micro_batch x accum` rows on every
rank (the epoch's last step fewer), every rank takes the same number of steps, and each rank's loss is weighted by
its share of the step, as in memory. The epoch's order is the stream's order (deterministic: the launcher keeps
Ray Data's order) shuffled in windows of `buffer` rows by a generator seeded with (seed, epoch, rank): the same
order again on a resume, which skips the epoch's steps already trained by streaming past their rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from dtrain.data.base import Batch, BatchPlan, Loaders
from dtrain.errors import DataError
from dtrain.models.base import DataMeta

EpochRows = Callable[[], Iterator[dict[str, np.ndarray]]]
"""Starts one epoch of this rank's rows: numpy batches {"x": features, "y": targets (absent when unsupervised)}."""


@dataclass
class StreamData:
    """A streamed data set as a worker sees it: what a model needs to know, rows per split over all ranks, and
    (filled in by the launcher inside the worker) each split's epoch function."""

    meta: DataMeta
    counts: dict[str, int]
    shuffle_buffer: int = 10_000
    epochs: dict[str, EpochRows] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return self.counts["train"]


def _windows(batches: Iterator[dict[str, np.ndarray]], size: int) -> Iterator[dict[str, np.ndarray]]:
    """The stream re-cut into windows of exactly `size` rows (the last one shorter): independent of how the
    stream happens to be batched."""
    held: list[dict[str, np.ndarray]] = []
    count = 0
    for batch in batches:
        n = len(batch["x"])
        if not n:
            continue
        held.append(batch)
        count += n
        while count >= size:
            merged = {k: np.concatenate([b[k] for b in held]) for k in held[0]}
            yield {k: v[:size] for k, v in merged.items()}
            rest = {k: v[size:] for k, v in merged.items()}
            count -= size
            held = [rest] if count else []
    if count:
        yield {k: np.concatenate([b[k] for b in held]) for k in held[0]}


def _shuffled(batches: Iterator[dict[str, np.ndarray]], size: int, generator: torch.Generator | None
              ) -> Iterator[dict[str, np.ndarray]]:
    for window in _windows(batches, size):
        if generator is not None:
            order = torch.randperm(len(window["x"]), generator=generator).numpy()
            window = {k: v[order] for k, v in window.items()}
        yield window


def _rows(batches: Iterator[dict[str, np.ndarray]], counts: list[int], who: str) -> Iterator[dict[str, np.ndarray]]:
    """Cut the stream into pieces of the given row counts; DataError if it ends early, the rest is drained."""
    pieces = (b for b in batches if len(b["x"]))
    pending: dict[str, np.ndarray] | None = None
    for want in counts:
        parts, have = [], 0
        while have < want:
            if pending is None:
                pending = next(pieces, None)
                if pending is None:
                    raise DataError(f"data: {who} streamed fewer rows than the driver counted: did the files change "
                                    "while training?")
            take = min(want - have, len(pending["x"]))
            parts.append({k: v[:take] for k, v in pending.items()})
            have += take
            pending = {k: v[take:] for k, v in pending.items()} if take < len(pending["x"]) else None
        yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    for _ in pieces:  # Ray's equal split leaves nothing over; finishing the epoch keeps the ranks' streams in step
        pass


def _tensors(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, ...]:
    keys = ("x", "y") if "y" in batch else ("x",)
    return tuple(torch.from_numpy(np.ascontiguousarray(batch[k])).to(device, non_blocking=True) for k in keys)


class StreamLoader:
    """This rank's training micro-batches of a stream of rows (see the module's docstring)."""

    def __init__(self, epoch_rows: EpochRows, n_rows: int, plan: BatchPlan, rank: int, device: torch.device, *,
                 seed: int = 0, buffer: int = 10_000, shuffle: bool = True) -> None:
        self.epoch_rows, self.plan, self.rank, self.device = epoch_rows, plan, rank, device
        self.per_rank = n_rows // plan.world  # Ray Data's equal split: the same rows on every rank
        self.step_rows = plan.micro_batch * plan.accum
        self.seed, self.buffer, self.shuffle, self.epoch = seed, buffer, shuffle, 0
        if self.per_rank == 0:
            raise DataError(f"data: {n_rows} training rows cannot be shared by {plan.world} workers")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_per_epoch(self) -> int:
        return math.ceil(self.per_rank / self.step_rows)

    def _layout(self) -> list[tuple[int, int, bool]]:
        """(rows on this rank, step_samples, last) of each micro-batch of the epoch."""
        out = []
        for start in range(0, self.per_rank, self.step_rows):
            rows = min(self.step_rows, self.per_rank - start)
            cuts = [min(self.plan.micro_batch, rows - s) for s in range(0, rows, self.plan.micro_batch)]
            out += [(c, rows * self.plan.world, i == len(cuts) - 1) for i, c in enumerate(cuts)]
        return out

    def iter_from(self, samples: int = 0) -> Iterator[Batch]:
        step_samples = self.step_rows * self.plan.world
        if samples % step_samples and samples < self.per_rank * self.plan.world:
            raise ValueError(f"resume position {samples} is not at a step boundary of {step_samples} samples")
        generator = None
        if self.shuffle:
            generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank)
        layout = self._layout()
        skip = min(math.ceil(samples / step_samples), self.steps_per_epoch())
        skip_micro = _micro_before(layout, skip) if skip else 0
        stream = _shuffled(self.epoch_rows(), self.buffer, generator)
        pieces = _rows(stream, [rows for rows, _, _ in layout], f"rank {self.rank}")
        for i, (piece, (rows, step, last)) in enumerate(zip(pieces, layout, strict=False)):
            if i >= skip_micro:  # the steps already trained are streamed past: the order stays the same
                yield Batch(_tensors(piece, self.device), rows, step, last)


def _micro_before(layout: list[tuple[int, int, bool]], steps: int) -> int:
    """How many micro-batches the epoch's first `steps` steps have."""
    ends = [i + 1 for i, (_, _, last) in enumerate(layout) if last]
    return ends[steps - 1]


class StreamEval:
    """This rank's evaluation batches of a streamed split: every rank the same number of rows and batches."""

    def __init__(self, epoch_rows: EpochRows | None, n_rows: int, batch_size: int, rank: int, world: int,
                 device: torch.device) -> None:
        self.epoch_rows, self.batch_size, self.rank, self.device = epoch_rows, batch_size, rank, device
        self.per_rank, self.world = n_rows // world, world

    def __len__(self) -> int:
        return self.per_rank * self.world

    def __iter__(self) -> Iterator[Batch]:
        if not len(self) or self.epoch_rows is None:
            return
        cuts = [min(self.batch_size, self.per_rank - s) for s in range(0, self.per_rank, self.batch_size)]
        for piece in _rows(self.epoch_rows(), cuts, f"rank {self.rank}"):
            yield Batch(_tensors(piece, self.device), len(piece["x"]), len(self))


def stream_loaders(data: StreamData, plan: BatchPlan, rank: int, device: torch.device, seed: int) -> Loaders:
    """The training stream dealt by global batch, val/test streamed in equal shares."""
    return Loaders(
        StreamLoader(data.epochs["train"], data.counts["train"], plan, rank, device, seed=seed,
                     buffer=data.shuffle_buffer),
        StreamEval(data.epochs.get("val"), data.counts.get("val", 0), plan.micro_batch, rank, plan.world, device),
        StreamEval(data.epochs.get("test"), data.counts.get("test", 0), plan.micro_batch, rank, plan.world, device))
