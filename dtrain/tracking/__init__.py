"""Rank 0's record of a run: metrics.jsonl (one JSON object per logged event), summary.json, and the trackers a
job enables (W&B, TensorBoard, MLflow), each a Sink fed the same events (see dtrain.tracking.base for the mapping).

Tracker libraries are imported lazily, only by a job that enables them; the engine never imports them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dtrain.errors import ConfigError
from dtrain.tracking.base import Sink, clean, latest_checkpoint_dir
from dtrain.tracking.mlflow_sink import MLFLOW_ID_FILE, MlflowSink, mlflow_settings
from dtrain.tracking.tensorboard_sink import TensorBoardSink, tensorboard_dir
from dtrain.tracking.wandb_sink import WANDB_ID_FILE, WandbSink, has_api_key, wandb_mode, wandb_run_id

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"

__all__ = ["CONFIG_FILE", "METRICS_FILE", "MLFLOW_ID_FILE", "SUMMARY_FILE", "WANDB_ID_FILE", "JsonlSink", "Sink",
           "Tracker", "has_api_key", "latest_checkpoint_dir", "preflight", "read_metrics", "wandb_mode",
           "wandb_run_id"]


class JsonlSink:
    """metrics.jsonl (appended: resumed runs keep appending), summary.json at the end, epoch lines on stdout."""

    def __init__(self, run_dir: Path, echo: bool = True) -> None:
        self.run_dir, self.echo = run_dir, echo
        self._file = open(run_dir / METRICS_FILE, "a", buffering=1)

    def log(self, record: dict[str, Any]) -> None:
        """Append the record; print epoch lines; write summary.json at the end event."""
        self._file.write(json.dumps(record) + "\n")
        if self.echo and record.get("event") == "epoch":
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "time")
            print(f"[dtrain] stage={record.get('stage')} epoch={record['epoch']} step={record['step']} {shown}",
                  flush=True)
        if record.get("event") == "end":
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(record, indent=2) + "\n")

    def finish(self, failed: bool = False) -> None:
        """Close metrics.jsonl."""
        self._file.close()


class Tracker:
    """Hands every logged event to metrics.jsonl and to each enabled tracker, in that order.

    Use it as a context manager so that a failed run is marked failed in the trackers. A tracker with
    enabled=auto that cannot start is one warning line and the run goes on; with enabled=true it is an error.
    """

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None, echo: bool = True,
                 after: list[Sink] = ()) -> None:
        """after: sinks handed every event after the others, and finished last (the copy to a run's store)."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config, self.echo = config or {}, echo
        self.sinks: list[Sink] = [JsonlSink(self.run_dir, echo)]
        self.wandb: WandbSink | None = None
        try:
            for name, start in _optional_sinks(self.run_dir, self.config):
                sink = self._start(name, start)
                if sink is not None:
                    self.sinks.append(sink)
                    self.wandb = sink if name == "wandb" else self.wandb
            self.sinks += after
        except BaseException:
            self.close(failed=True)
            raise

    def _start(self, name: str, start: Callable[[], Sink | None]) -> Sink | None:
        try:
            return start()
        except ConfigError as err:
            section = (self.config.get("logging") or {}).get(name) or {}
            if str(section.get("enabled", "auto")).lower() != "auto":
                raise
            label = {"wandb": "W&B", "mlflow": "MLflow"}.get(name, name)
            print(f"[dtrain] {label} is off for this run: {err}", flush=True)  # auto: a tracker must not stop training
            return None

    def log(self, record: dict[str, Any]) -> None:
        """Record one event (a 'time' stamp is added) in every sink."""
        record = {"time": time.time(), **clean(record)}
        for sink in self.sinks:
            sink.log(record)

    def close(self, failed: bool = False) -> None:
        """Close metrics.jsonl and finish every tracker's run (marked failed when training raised)."""
        sinks, self.sinks, self.wandb = self.sinks, [], None
        for sink in sinks:
            sink.finish(failed)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def _optional_sinks(run_dir: Path, job: dict[str, Any]) -> list[tuple[str, Callable[[], Sink | None]]]:
    """(section, starter) of each tracker the job may enable; a starter returns None when its tracker is off."""
    if not job:
        return []
    logging = job.get("logging") or {}

    def wandb() -> Sink | None:
        cfg = logging.get("wandb") or {}
        mode = wandb_mode(cfg)
        return WandbSink(run_dir, job, cfg, mode) if mode else None

    def tensorboard() -> Sink | None:
        folder = tensorboard_dir(run_dir, job)
        return TensorBoardSink(folder, job) if folder else None

    def mlflow() -> Sink | None:
        cfg = mlflow_settings(job)
        return MlflowSink(run_dir, job, cfg) if cfg else None

    return [("wandb", wandb), ("tensorboard", tensorboard), ("mlflow", mlflow)]


def preflight(job: dict[str, Any]) -> dict[str, str]:
    """On the driver, before Ray starts: raise a ConfigError for a tracker that is enabled=true and cannot work (an
    unwritable TensorBoard dir, an MLflow server that does not answer); returns {section: reason} for the
    enabled=auto ones that cannot (the caller switches them off for the run, with one warning line)."""
    from dtrain.tracking.mlflow_sink import connect
    from dtrain.tracking.tensorboard_sink import check_writable

    off: dict[str, str] = {}
    tensorboard = (job.get("logging") or {}).get("tensorboard") or {}
    if tensorboard.get("enabled") and tensorboard.get("dir"):  # (the default folder is inside the run dir)
        run_dir = Path(job.get("runs_dir") or "runs") / str(job.get("name"))
        check_writable(tensorboard_dir(run_dir, job))  # a plain switch: a bad dir is always an error
    cfg = mlflow_settings(job)
    if cfg is not None:
        try:
            connect(cfg)
        except ConfigError as err:
            if str(cfg.get("enabled", "auto")).lower() != "auto":
                raise
            off["mlflow"] = str(err)
    return off


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All events of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
