"""Where training is: saved in every checkpoint so a resumed run continues exactly, at any world size."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    """The loop's position and bookkeeping. Positions are in optimizer steps and samples, never in per-rank
    batches, so that they mean the same thing whatever the number of workers."""

    stage: int = 0
    epoch: int = 0
    epoch_samples: int = 0
    """Samples of the current epoch already trained (for mid-epoch resume)."""
    step: int = 0
    """Optimizer steps done over the whole run (the LR schedule follows it)."""
    samples: int = 0
    """Samples trained over the whole run."""
    global_batch: int = 0
    """Samples per optimizer step: a resume must keep it (0: not recorded, an older checkpoint)."""
    skipped_steps: int = 0
    epochs_done: int = 0
    """Epochs completed over all stages."""
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    stop_reason: str = ""
    history: dict[str, Any] = field(default_factory=dict)
