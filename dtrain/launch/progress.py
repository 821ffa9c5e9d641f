"""A console progress bar on the driver, fed by rank 0's metrics.jsonl (so workers never draw to a terminal)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from dtrain.tracking import METRICS_FILE


class ProgressFollower(threading.Thread):
    """Tails <run_dir>/metrics.jsonl from its current end and draws one rich progress bar per stage."""

    def __init__(self, run_dir: Path, poll_s: float = 0.5, console: Any = None) -> None:
        super().__init__(daemon=True, name="dtrain-progress")
        self.path, self.poll_s, self.console = Path(run_dir) / METRICS_FILE, poll_s, console
        self.offset = self.path.stat().st_size if self.path.exists() else 0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)

    def run(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.fields[info]}"))
        with Progress(*columns, transient=False, console=self.console) as progress:
            task, base = None, 0
            while True:
                stopping = self._halt.is_set()  # read before draining so the last records are always shown
                for record in self._new_records():
                    event = record.get("event")
                    if event == "stage":
                        total = record["epochs"] * record["steps_per_epoch"]
                        task = progress.add_task(f"{record['stage']}", total=total, info="")
                        base = record.get("first_step", 0)  # the global step this stage began at
                    elif event == "step" and task is not None:
                        loss = record.get("train/loss")
                        info = f"loss {loss:.4f}" if isinstance(loss, float) else ""
                        progress.update(task, completed=record["step"] - base, info=info)
                    elif event == "epoch" and task is not None:
                        shown = " ".join(f"{k}={v:.4f}" for k, v in record.items() if k.startswith("val/"))
                        progress.update(task, completed=record["step"] - base, info=f"epoch {record['epoch']} {shown}")
                    elif event == "end":
                        if task is not None and record.get("stop_reason", "completed") != "completed":
                            # stopped early (early stopping, max_steps): the bar ends full at the step reached
                            done = next(t.completed for t in progress.tasks if t.id == task)
                            reason = record["stop_reason"].split(":")[0]  # e.g. "early stopping"
                            progress.update(task, total=done, info=f"stopped: {reason}")
                        return
                if stopping:
                    return
                self._halt.wait(self.poll_s)

    def _new_records(self) -> list[dict]:
        if not self.path.exists():
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]  # leave a half-written last line for the next poll
        self.offset += len(complete.encode())
        return [json.loads(line) for line in complete.splitlines() if line.strip()]
