"""The seam between the training loop and a distributed strategy: what every strategy is given and provides."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from dtrain.engine.optim import OptimConfig
from dtrain.engine.precision import Precision
from dtrain.engine.prepare import CompileOptions


@dataclass
class StrategySetup:
    """The explicit set-up arguments every strategy takes (no config sections: the launcher fills these in)."""

    device: torch.device
    precision: Precision
    optim: OptimConfig
    grad_clip: float | None = None
    """Clipping threshold; None disables clipping."""
    grad_clip_mode: str = "norm"
    """norm (total L2 norm) or value (element-wise)."""
    micro_batch: int = 1
    """Samples one rank feeds forward at a time (the largest micro-batch of the batch plan)."""
    accum: int = 1
    """Micro-batches per optimizer step."""
    compile: CompileOptions | None = None
    """torch.compile settings; None runs eagerly (applied by engine.prepare.prepare_model in setup)."""
    activation_checkpointing: bool | list[str] = False
    """Recompute these layers' activations in the backward (true: every top-level layer; see prepare_model)."""


@dataclass
class StepResult:
    """Outcome of one optimizer step, as device tensors so that the loop never waits for the device to learn it."""

    grad_norm: Tensor
    """Total gradient norm before clipping."""
    skipped: Tensor
    """0-dim float, 1.0 when the step was skipped because the gradients were not finite. Under fp16 an overflow is
    the loss scaler's business (it skips the step and lowers the scale), so there a non-finite loss counts instead."""


class Strategy(Protocol):
    """What the training loop talks to. Implementations are registered by name in dtrain.engine.strategies."""

    Options: ClassVar[type | None]
    """The dataclass of this strategy's own section of the job, trainer.<name> (None: it has none)."""
    device: torch.device

    def __init__(self, setup: StrategySetup, options: Any) -> None: ...

    @classmethod
    def check(cls, options: Any, *, precision: str, grad_clip: float | None, grad_clip_mode: str,
              grad_accum: int) -> None:
        """Raise ConfigError for settings this strategy cannot run, when the job is loaded (before any worker)."""

    def setup(self, model: nn.Module, lr: float, total_steps: int, steps_per_epoch: int) -> nn.Module:
        """Wrap the model for distributed training and build its optimizer and LR schedule; returns what the loop
        calls. Called again for each stage of a staged model (the weights carry over)."""

    def autocast(self) -> ContextManager:
        """The context forward passes run in (mixed precision)."""

    def no_sync(self, enabled: bool) -> ContextManager:
        """Skip gradient synchronisation while accumulating micro-batches (enabled=True)."""

    def backward(self, loss: Tensor) -> None: ...

    def step(self, loss: Tensor) -> StepResult:
        """Unscale, measure and clip the gradients; step the optimizer unless they are not finite; step the
        schedule; zero the gradients. loss: the window's loss (detached). No host synchronisation where the
        optimizer allows it."""

    def lr(self) -> float: ...

    def retarget(self, lr: float) -> None:
        """Apply this job's optimizer settings to a restored optimizer (a run started from another's checkpoint)."""

    def weights_finite(self) -> bool:
        """Whether every weight is finite (each rank checks what it holds; the answer is the same on all ranks)."""

    def snapshot(self, folder: Path) -> Callable[[], None]:
        """Capture this rank's share of model, optimizer, schedule and scaler now (a step boundary), and return
        what writes it into folder (a folder this rank owns; the launcher merges the ranks' folders), which may run
        in a background thread while training goes on. Sharded strategies write shards: nothing is gathered. A
        strategy that cannot capture cheaply writes here and returns a no-op."""

    def load(self, folder: Path) -> None:
        """Restore what save wrote (all ranks' files merged in folder) into the set-up model and optimizer."""

    def full_state_dict(self) -> dict[str, Tensor]:
        """The model's full float32 weights and buffers on the CPU (a collective where weights are sharded)."""

    def load_full_state_dict(self, state: dict[str, Tensor]) -> bool:
        """Put weights that full_state_dict returned back into the model (every rank, after training: the loop
        evaluates the best epoch's weights this way). False where the strategy cannot (weights left as they are)."""
