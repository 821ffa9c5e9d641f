"""trainer.profile: torch.profiler over chosen optimizer steps on chosen ranks, as an engine Callback.

The launcher installs the callback only when trainer.profile.enabled, so an unprofiled run has no profiler code in
its loop at all. Each profiled rank writes into <run dir>/profile/: rank<r>.pt.trace.json (a Chrome trace: open it
in Perfetto or chrome://tracing; `tensorboard --logdir <run dir>` shows the folder in its profiler tab) and
rank<r>.ops.json, the operators by self time that `dtrain report` tabulates.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtrain.engine.callbacks import Callback
from dtrain.engine.state import TrainState
from dtrain.errors import check

PROFILE_DIR = "profile"
TOP_OPERATORS = 30


@dataclass
class ProfileConfig:
    enabled: bool = False
    """Profile the steps below with torch.profiler (traces under <run dir>/profile/)."""
    wait: int = 1
    """Optimizer steps skipped before profiling starts (after the run's setup, per run attempt)."""
    warmup: int = 1
    """Steps traced but discarded (the profiler's own start-up cost falls in them)."""
    active: int = 3
    """Steps recorded."""
    ranks: list[int] = field(default_factory=lambda: [0])
    """Ranks that profile (each writes its own trace)."""
    memory: bool = False
    """Also record tensor allocations (memory per operator; slower)."""

    def __post_init__(self) -> None:
        check(self.wait >= 0, "trainer.profile.wait", "an integer >= 0", self.wait)
        check(self.warmup >= 0, "trainer.profile.warmup", "an integer >= 0", self.warmup)
        check(self.active >= 1, "trainer.profile.active", "an integer >= 1", self.active)
        check(len(self.ranks) > 0 and all(isinstance(r, int) and r >= 0 for r in self.ranks),
              "trainer.profile.ranks", "a non-empty list of ranks (integers >= 0)", list(self.ranks))

    @property
    def last_step(self) -> int:
        """The step count at which the recorded window ends."""
        return self.wait + self.warmup + self.active


class Profiler(Callback):
    """Runs torch.profiler on the ranks listed in cfg over wait/warmup/active optimizer steps (one cycle)."""

    def __init__(self, cfg: ProfileConfig, run_dir: str | Path) -> None:
        self.cfg, self.folder = cfg, Path(run_dir) / PROFILE_DIR
        self.prof: Any = None
        self.done = False

    def on_setup(self, strategy: Any, model: nn.Module, rank: int) -> None:
        if rank not in self.cfg.ranks or self.prof is not None or self.done:
            return  # one cycle per run: a later stage of a staged model is not profiled again
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=activities, profile_memory=self.cfg.memory, record_shapes=self.cfg.memory,
                            schedule=schedule(wait=self.cfg.wait, warmup=self.cfg.warmup, active=self.cfg.active,
                                              repeat=1),
                            on_trace_ready=lambda prof: self._write(prof, rank))
        self.prof.start()

    def on_step_end(self, state: TrainState, rank: int) -> None:
        if self.prof is None:
            return
        self.prof.step()
        if self.done:
            self.prof.stop()
            self.prof = None

    def _write(self, prof: Any, rank: int) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.folder / f"rank{rank}.pt.trace.json"))
        # ProfilerStep* is the profiler's own span around each step, not an operator
        rows = sorted((e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")),
                      key=lambda e: e.self_cpu_time_total + e.self_device_time_total, reverse=True)
        ops = [{"name": e.key, "calls": e.count, "self_cpu_us": e.self_cpu_time_total, "cpu_us": e.cpu_time_total,
                "self_device_us": e.self_device_time_total, "self_cpu_memory_bytes": e.self_cpu_memory_usage,
                "self_device_memory_bytes": e.self_device_memory_usage} for e in rows[:TOP_OPERATORS]]
        (self.folder / f"rank{rank}.ops.json").write_text(json.dumps({"steps": self.cfg.active, "ops": ops},
                                                                     indent=1))
        self.done = True
        print(f"[dtrain] profiler: rank {rank} trace written to {self.folder}", flush=True)
