"""MLflow: one MLflow run per dtrain run (rank 0), through MlflowClient (mlflow imported lazily, only when enabled).

The run gets the job as flat parameters (model.hidden, optim.lr, ...), step and epoch values as metrics at their
global step (batched, at most every FLUSH_EVERY_S seconds, and sent by MLflow's logging thread: a logged step
does not wait for the server), the summary as metrics at the final step
plus tags (dtrain.stop_reason), and with log_checkpoint the latest checkpoint folder as the artifact 'checkpoint'.
Its id is kept in the run dir's mlflow_run_id.txt so that --resume and Ray's failure restarts continue it; under
`dtrain tune` each trial is a run nested under one parent run per search, found again by its dtrain.key tag.
Credentials come from MLflow's own environment variables (MLFLOW_TRACKING_TOKEN, ..._USERNAME/_PASSWORD) and are
never written anywhere by dtrain; a tracking URI that embeds a password is refused by the config check.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dtrain.errors import ConfigError, first_line
from dtrain.tracking.base import final_checkpoint, flatten, kept_id, numbers, step_values, summary_values

MLFLOW_ID_FILE = "mlflow_run_id.txt"
KEY_TAG = "dtrain.key"
FLUSH_EVERY_S = 5.0
"""Step and epoch metrics are sent in one request at most this often (and at the end)."""
_MAX_PARAM_LEN, _MAX_BATCH, _MAX_METRICS = 6000, 100, 1000


def mlflow_settings(job: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any] | None:
    """logging.mlflow with its tracking_uri resolved (the section's, else MLFLOW_TRACKING_URI), or None when MLflow
    is off: enabled=false, or auto without a tracking URI. true without a URI is a ConfigError."""
    env = os.environ if env is None else env
    cfg = dict((job.get("logging") or {}).get("mlflow") or {})
    enabled = str(cfg.get("enabled", "auto")).lower()
    cfg["tracking_uri"] = cfg.get("tracking_uri") or env.get("MLFLOW_TRACKING_URI") or None
    if enabled == "false" or (enabled == "auto" and not cfg["tracking_uri"]):
        return None
    if not cfg["tracking_uri"]:
        raise ConfigError("logging.mlflow.tracking_uri: required when logging.mlflow.enabled is true "
                          "(or set MLFLOW_TRACKING_URI)")
    return cfg


@contextlib.contextmanager
def _quick_requests() -> Iterator[None]:
    """While starting: one retry and a short timeout, so that a server that does not answer is reported in seconds
    (MLflow's defaults retry for minutes); the user's own settings win."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)


def _experiment_id(client: Any, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # another process created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def connect(cfg: dict[str, Any]) -> tuple[Any, str]:
    """(MlflowClient, experiment id), or a ConfigError naming logging.mlflow.tracking_uri if the server does not
    answer."""
    from mlflow.tracking import MlflowClient

    uri = cfg["tracking_uri"]
    try:
        with _quick_requests():
            client = MlflowClient(tracking_uri=uri)
            return client, _experiment_id(client, cfg.get("experiment") or "dtrain")
    except Exception as err:  # connection refused, timeouts, HTTP errors, a bad store URI
        raise ConfigError(f"logging.mlflow.tracking_uri: no MLflow tracking server answers at {uri} "
                          f"({first_line(err)[:200]})") from None


class MlflowSink:
    """One MLflow run per dtrain run dir (see the module docstring)."""

    def __init__(self, run_dir: Path, job: dict[str, Any], cfg: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        self.Metric, self.Param, self.RunTag = Metric, Param, RunTag
        self.run_dir, self.cfg = Path(run_dir), cfg
        self.client, experiment = connect(cfg)
        self.pending: list[Any] = []
        self.buffer: list[Any] = []
        self.sent = time.monotonic()
        with _quick_requests():
            self.run_id, resumed = self._start(experiment, job)
            self._log_params(job, resumed)
        note = " (continued)" if resumed else ""
        print(f"[dtrain] MLflow run {self.run_id}{note} in experiment '{cfg.get('experiment') or 'dtrain'}' at "
              f"{cfg['tracking_uri']}", flush=True)

    def _start(self, experiment: str, job: dict[str, Any]) -> tuple[str, bool]:
        path = self.run_dir / MLFLOW_ID_FILE
        run_id, key = kept_id(path), self.cfg.get("key")
        if not run_id and key:
            found = self.client.search_runs([experiment], filter_string=f"tags.`{KEY_TAG}` = '{key}'", max_results=1)
            run_id = found[0].info.run_id if found else ""
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            resumed = True
        else:
            tags = {str(k): str(v) for k, v in (self.cfg.get("tags") or {}).items()}
            tags |= {KEY_TAG: key} if key else {}
            tags |= {"mlflow.parentRunId": self.cfg["parent_run_id"]} if self.cfg.get("parent_run_id") else {}
            name = self.cfg.get("run_name") or job.get("name")
            run_id = self.client.create_run(experiment, run_name=name, tags=tags).info.run_id
            resumed = False
        path.write_text(run_id + "\n")
        return run_id, resumed

    def _log_params(self, job: dict[str, Any], resumed: bool) -> None:
        # MLflow parameters cannot change: a resumed run (maybe with new overrides) adds only keys it lacks
        have = self.client.get_run(self.run_id).data.params if resumed else {}
        params = [self.Param(k[:250], _param_text(v)) for k, v in flatten(job).items() if k[:250] not in have]
        for i in range(0, len(params), _MAX_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + _MAX_BATCH])

    def _metrics(self, values: dict[str, float], step: int, when: float | None) -> list[Any]:
        stamp = int((when or time.time()) * 1000)
        return [self.Metric(k, float(v), stamp, step) for k, v in values.items()]

    def log(self, record: dict[str, Any]) -> None:
        """Send one dtrain event to the MLflow run (see dtrain.tracking.base for the mapping)."""
        at = step_values(record)
        if at is not None:
            self.buffer += self._metrics(at[1], at[0], record.get("time"))
            if len(self.buffer) >= _MAX_METRICS or time.monotonic() - self.sent >= FLUSH_EVERY_S:
                self._flush()
        elif record.get("event") == "end":
            self._flush()
            self._summarize(record)

    def _flush(self) -> None:
        # One request per FLUSH_EVERY_S, sent by MLflow's logging thread: a request per logged step costs the
        # training processes (and a server on the same machine) far more than the metrics themselves.
        for i in range(0, len(self.buffer), _MAX_METRICS):
            self.pending.append(self.client.log_batch(self.run_id, metrics=self.buffer[i:i + _MAX_METRICS],
                                                      synchronous=False))
        self.buffer, self.sent = [], time.monotonic()

    def _summarize(self, record: dict[str, Any]) -> None:
        summary, step = summary_values(record), record.get("steps", 0)
        tags = [self.RunTag(f"dtrain.{k}", str(v)) for k, v in summary.items() if isinstance(v, str)]
        self.client.log_batch(self.run_id, metrics=self._metrics(numbers(summary), step, record.get("time")),
                              tags=tags)
        if self.cfg.get("log_checkpoint"):
            found = final_checkpoint(self.run_dir, record, "MLflow")
            if found is not None:
                self.client.log_artifacts(self.run_id, str(found[0]), artifact_path="checkpoint")
                self.client.set_tag(self.run_id, "dtrain.checkpoint_step", str(found[1]))

    def finish(self, failed: bool = False) -> None:
        """Send the buffered metrics and wait for them, then end the run (FAILED when training raised)."""
        try:
            self._flush()
            for operation in self.pending:
                operation.wait()
        except Exception as err:  # the record in metrics.jsonl is complete; say what MLflow missed
            print(f"[dtrain] MLflow: some metrics were not logged ({first_line(err)[:200]})", flush=True)
        self.pending = []
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


def _param_text(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return text[:_MAX_PARAM_LEN]


def start_search_run(job: dict[str, Any], kept: str = "") -> str | None:
    """dtrain tune: the parent MLflow run of a search (its trials nest under it); kept: the id a resumed search
    recorded (MLFLOW_ID_FILE in its folder), which it continues. None when MLflow is off."""
    cfg = mlflow_settings(job)
    if cfg is None:
        return None
    client, experiment = connect(cfg)
    with _quick_requests():
        if kept:
            client.update_run(kept, status="RUNNING")
            return kept
        return client.create_run(experiment, run_name=job.get("name"),
                                 tags={"dtrain.search": str(job.get("name"))}).info.run_id


def end_search_run(job: dict[str, Any], run_id: str | None, failed: bool) -> None:
    """Mark a search's parent run finished (or failed)."""
    cfg = mlflow_settings(job)
    if cfg is not None and run_id:
        client, _ = connect(cfg)
        client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
