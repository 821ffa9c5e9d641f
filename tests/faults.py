"""Faults the tests inject into real training processes, and probes they install there, as engine callbacks
(installed by the launchers)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from torch import nn

from dtrain.engine.callbacks import Callback
from dtrain.engine.state import TrainState


class KillAt(Callback):
    """SIGKILL the process of `rank` right after optimizer step `step`, once: the marker file is created first, so
    the restarted or resumed run trains on. delay_s: seconds the process lives on first (its background uploads
    go on meanwhile)."""

    def __init__(self, rank: int, step: int, marker: str | Path, delay_s: float = 0.0) -> None:
        self.rank, self.step, self.marker, self.delay_s = rank, step, Path(marker), delay_s

    def on_step_end(self, state: TrainState, rank: int) -> None:
        if rank == self.rank and state.step == self.step and not self.marker.exists():
            self.marker.touch()
            time.sleep(self.delay_s)
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(Callback):
    """Send `signum` to the process of `rank` right after optimizer step `step`, once (the marker file first), as a
    scheduler would from outside (SIGTERM: a spot reclaim, a pod deletion)."""

    def __init__(self, rank: int, step: int, marker: str | Path, signum: int = signal.SIGTERM) -> None:
        self.rank, self.step, self.marker, self.signum = rank, step, Path(marker), signum

    def on_step_end(self, state: TrainState, rank: int) -> None:
        if rank == self.rank and state.step == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), self.signum)


class ReportThreads(Callback):
    """In each Ray Train worker, record which thread hands each checkpoint to ray.train.report: a line per report,
    the thread's name, in <folder>/rank<r>.txt."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_setup(self, strategy: Any, model: nn.Module, rank: int) -> None:
        import ray.train

        report, log = ray.train.report, self.folder / f"rank{rank}.txt"

        def recorded(metrics: dict, checkpoint: Any = None, **kwargs: Any) -> None:
            if checkpoint is not None:
                with open(log, "a") as f:
                    f.write(threading.current_thread().name + "\n")
            report(metrics, checkpoint=checkpoint, **kwargs)

        ray.train.report = recorded
