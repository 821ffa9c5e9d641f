"""Rank 0's record of a run: metrics.jsonl (one JSON object per logged step/epoch event) and summary.json."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class Tracker:
    """Appends every logged event to metrics.jsonl (resumed runs keep appending) and prints epoch lines."""

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None, echo: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config, self.echo = config or {}, echo
        self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **_clean(record)}
        self._file.write(json.dumps(record) + "\n")
        if self.echo and record.get("event") == "epoch":
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "time")
            print(f"[dtrain] stage={record.get('stage')} epoch={record['epoch']} step={record['step']} {shown}",
                  flush=True)
        if record.get("event") == "end":
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(_clean(record), indent=2) + "\n")

    def close(self) -> None:
        self._file.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All events of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
