"""TensorBoard: event files written with tensorboardX (imported lazily, only when logging.tensorboard.enabled).

Step and epoch values go in as scalars at their global step, the job as a text entry ('config'), and the end
event's summary as scalars at the final step plus a 'summary' text entry. A resumed run appends a new event file
to the same folder, continuing the step axis; TensorBoard shows one run per folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dtrain.errors import ConfigError
from dtrain.tracking.base import numbers, step_values, summary_values

TENSORBOARD_DIR = "tensorboard"


def tensorboard_dir(run_dir: str | Path, job: dict[str, Any]) -> Path | None:
    """The folder of this run's event files (None when TensorBoard is off): <dir>/<name> when logging.tensorboard
    sets a dir (so several runs share one `tensorboard --logdir`), else <run_dir>/tensorboard."""
    cfg = (job.get("logging") or {}).get("tensorboard") or {}
    if not cfg.get("enabled"):
        return None
    if not cfg.get("dir"):
        return Path(run_dir) / TENSORBOARD_DIR
    return Path(cfg["dir"]).expanduser() / (cfg.get("name") or job.get("name") or Path(run_dir).name)


def check_writable(folder: Path) -> None:
    """Create folder and write a file there, or raise a ConfigError naming logging.tensorboard.dir."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".dtrain-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"logging.tensorboard.dir: cannot write event files in {folder} "
                          f"({err.strerror or err})") from None


class TensorBoardSink:
    """One TensorBoard run (folder of event files) per dtrain run, written by rank 0 only."""

    def __init__(self, folder: Path, job: dict[str, Any]) -> None:
        from tensorboardX import SummaryWriter

        check_writable(folder)
        self.folder = folder
        self.writer = SummaryWriter(logdir=str(folder), flush_secs=30)
        self.writer.add_text("config", _code(job))
        print(f"[dtrain] TensorBoard events: {folder} (view with: tensorboard --logdir {folder.parent})", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        """Scalars at their global step; the summary at the final step (see the module docstring)."""
        at = step_values(record)
        if at is not None:
            self._scalars(at[1], at[0], record.get("time"))
        elif record.get("event") == "end":
            summary = summary_values(record)
            self._scalars(numbers(summary), record.get("steps", 0), record.get("time"))
            self.writer.add_text("summary", _code(summary), record.get("steps", 0))

    def _scalars(self, values: dict[str, float], step: int, walltime: float | None) -> None:
        # One event holding all of a step's values: add_scalar writes an event per value, at about eight times
        # the CPU time per logged step
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()])
        self.writer.file_writer.add_summary(summary, global_step=step, walltime=walltime)

    def finish(self, failed: bool = False) -> None:
        """Flush and close the event file (a failed run's events are kept as they are)."""
        self.writer.close()


def _code(values: dict[str, Any]) -> str:
    # TensorBoard renders text entries as markdown: indent by 4 to show JSON verbatim
    return "\n".join("    " + line for line in json.dumps(values, indent=2, default=str).splitlines())
