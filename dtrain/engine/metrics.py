"""What the loop keeps on the device between read-backs: metric sums and non-finite step flags."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from dtrain.engine import dist
from dtrain.engine.state import TrainState
from dtrain.errors import TrainingError


class NonFiniteGuard:
    """Counts skipped (non-finite) steps and stops the run after `limit` of them in a row.

    The loop hands it each step's flag, a tensor on the device; the host reads the flags only in check(), which the
    loop calls where it reads metrics back anyway (log steps, checkpoints, epoch ends): a training step never waits
    for the device, and keeping a flag launches nothing. Skipped steps leave the weights untouched, so a run of
    them noticed a few steps late costs nothing but those steps.
    """

    def __init__(self, state: TrainState, limit: int, capacity: int) -> None:
        self.state, self.limit, self.capacity = state, limit, capacity
        self.flags: list[Tensor] = []

    def add(self, skipped: Tensor) -> None:
        if len(self.flags) == self.capacity:  # more steps than logging windows hold: read back now and then anyway
            self.check()
        self.flags.append(skipped)

    def check(self) -> None:
        """Account for the steps added since the last check (the newest is state.step)."""
        if not self.flags:
            return
        state, flags, self.flags = self.state, torch.stack(self.flags).tolist(), []
        run = state.history.get("nonfinite_run", 0)
        for step, skipped in enumerate(flags, start=state.step - len(flags) + 1):
            run = run + 1 if skipped else 0
            state.skipped_steps += bool(skipped)
            if run >= self.limit:
                raise TrainingError(f"training stopped: {self.limit} consecutive steps had a non-finite loss or "
                                    f"gradient (step {step}); lower optim.lr or set trainer.grad_clip")
        state.history["nonfinite_run"] = run


class MetricSums:
    """Sample-weighted sums of a model's metrics, kept on the device.

    add() only keeps a batch's metric tensors (no device work per batch); every `capacity` batches, and when read,
    the kept ones are summed with one stack, one sum and one add per distinct batch weight (usually one: only an
    epoch's last batch may be smaller).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.keys: list[str] = []
        self.totals: Tensor | None = None
        self.n, self.capacity, self.kept = 0, capacity, 0
        self.pending: dict[int, list[Tensor]] = {}

    def add(self, metrics: dict[str, Tensor], weight: int) -> None:
        if not self.keys:
            self.keys = list(metrics)
        # Detached: a kept tensor must not hold its batch's autograd graph.
        self.pending.setdefault(weight, []).extend(v.detach() if v.requires_grad else v for v in metrics.values())
        self.n += weight
        self.kept += 1
        if self.kept == self.capacity:
            self._fold()

    def _fold(self) -> None:
        for weight, values in self.pending.items():
            part = torch.stack(values).float().view(-1, len(self.keys)).sum(0)
            self.totals = part.mul_(weight) if self.totals is None else self.totals.add_(part, alpha=weight)
        self.pending, self.kept = {}, 0

    def reduce(self, prefix: str) -> dict[str, float]:
        """Means over all ranks' samples (one collective), as {prefix/key: value}."""
        self._fold()
        if self.totals is None:
            return {}
        packed = dist.all_reduce_sum(torch.cat([self.totals, self.totals.new_tensor([self.n])]))
        *totals, n = packed.tolist()
        return {f"{prefix}/{k}": v / max(n, 1.0) for k, v in zip(self.keys, totals, strict=True)}


class PhaseClock:
    """Host time of each phase of the training steps in a logging window (data wait, forward/backward, optimizer,
    other: logging, checkpoints, callbacks).

    Host clocks only: it never synchronises with the device. On a GPU, kernels run asynchronously, so a phase
    measures its launch time, and waiting for the device shows where the host waits (a read-back at a logged step
    lands in 'other', a strategy that synchronises inside its step in 'optimizer').
    """

    PHASES = ("data", "forward_backward", "optimizer", "other")

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.totals = dict.fromkeys(self.PHASES, 0.0)

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to phase."""
        now = time.perf_counter()
        self.totals[phase] += now - self.last
        self.last = now

    def read(self, steps: int) -> dict[str, float]:
        """Per-step means over the window as {time/<phase>_s: seconds}, and start a new window."""
        out = {f"time/{k}_s": v / max(steps, 1) for k, v in self.totals.items()}
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        return out
