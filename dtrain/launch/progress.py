"""A console progress bar on the driver, fed by rank 0's metrics.jsonl (so workers never draw to a terminal)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

from dtrain.storage import RunStore
from dtrain.tracking import METRICS_FILE


class ProgressFollower(threading.Thread):
    """Tails <run_dir>/metrics.jsonl from its current end and draws one rich progress bar per stage.
    run_dir in object storage (a RunStore): the object rank 0 copies there every few seconds is polled."""

    def __init__(self, run_dir: Path | RunStore, poll_s: float = 0.5, console: Any = None) -> None:
        super().__init__(daemon=True, name="dtrain-progress")
        self.store = run_dir if isinstance(run_dir, RunStore) else None
        self.path = None if self.store else Path(run_dir) / METRICS_FILE
        self.poll_s, self.console = (max(poll_s, 2.0) if self.store else poll_s), console
        self.offset = len(self._read(0))
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

    def _read(self, offset: int) -> bytes:
        """metrics.jsonl's bytes from offset on (none while there is no file)."""
        if self.store is not None:
            return (self.store.read_bytes(METRICS_FILE) or b"")[offset:]
        if not self.path.exists():
            return b""
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read()

    def _new_records(self) -> list[dict]:
        chunk = self._read(self.offset)
        complete = chunk[: chunk.rfind(b"\n") + 1]  # leave a half-written last line for the next poll
        self.offset += len(complete)
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
