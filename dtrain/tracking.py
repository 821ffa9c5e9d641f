"""Rank 0's record of a run: metrics.jsonl (one JSON object per logged event), summary.json, and optionally W&B.

W&B is imported here, lazily, and only when a job enables it; the engine never imports it. Each record the loop
logs has an 'event' key: stage, step, epoch, resume or end. The W&B mapping (what `dtrain report` and the tests
rely on): step events -> wandb.log at step=<global step> with their own keys (train/<metric>, train/grad_norm, lr,
samples_per_s, step_time_s, epoch); epoch events -> wandb.log at step=<global step> with val/* as they are and
train/<metric> renamed train/<metric>_epoch (so the epoch mean does not overwrite the step value); the end event
-> run summary (test/*, best/*, epochs, steps, wall_time_s, train_samples_per_s, stop_reason).
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dtrain.errors import ConfigError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
WANDB_ID_FILE = "wandb_id.txt"
_LEGACY_MODES = {"dryrun": "offline", "run": "online"}


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class Tracker:
    """Appends every logged event to metrics.jsonl (resumed runs keep appending), prints epoch lines, mirrors to W&B.

    Use it as a context manager so that a failed run is marked failed in W&B.
    """

    def __init__(self, run_dir: str | Path, config: dict[str, Any] | None = None, echo: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.config, self.echo = config or {}, echo
        self._file = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        wandb_cfg = (self.config.get("logging") or {}).get("wandb") or {}
        mode = wandb_mode(wandb_cfg) if self.config else None
        self.wandb: WandbSink | None = None
        try:
            self.wandb = WandbSink(self.run_dir, self.config, wandb_cfg, mode) if mode else None
        except ConfigError as err:
            if str(wandb_cfg.get("enabled", "auto")).lower() != "auto":
                self._file.close()
                raise
            print(f"[dtrain] W&B is off for this run: {err}", flush=True)  # auto: W&B must not stop training

    def log(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **_clean(record)}
        self._file.write(json.dumps(record) + "\n")
        if self.echo and record.get("event") == "epoch":
            shown = " ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "time")
            print(f"[dtrain] stage={record.get('stage')} epoch={record['epoch']} step={record['step']} {shown}",
                  flush=True)
        if record.get("event") == "end":
            (self.run_dir / SUMMARY_FILE).write_text(json.dumps(_clean(record), indent=2) + "\n")
        if self.wandb:
            self.wandb.log(record)

    def close(self, failed: bool = False) -> None:
        """Close metrics.jsonl and finish the W&B run (marked failed when training raised)."""
        self._file.close()
        if self.wandb:
            self.wandb.finish(failed)
            self.wandb = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.close(failed=exc_type is not None)


def wandb_mode(cfg: dict[str, Any], env: dict[str, str] | None = None) -> str | None:
    """'online' or 'offline' for logging.wandb (see WandbConfig), or None when W&B is off.

    Precedence: logging.wandb.enabled=false, then logging.wandb.mode, then WANDB_MODE, then the API key: auto goes
    online with a key and offline without one; true without a key and without an offline mode is a ConfigError.
    """
    env = os.environ if env is None else env
    enabled = str(cfg.get("enabled", "auto")).lower()
    if enabled == "false":
        return None
    mode = cfg.get("mode") or env.get("WANDB_MODE") or None
    mode = _LEGACY_MODES.get(mode, mode)
    if mode == "disabled":
        return None
    if mode in ("online", "offline"):
        if mode == "online" and enabled == "true" and not has_api_key(env):
            raise ConfigError("logging.wandb.mode: online needs a W&B API key (run `wandb login` or set "
                              "WANDB_API_KEY), or set logging.wandb.mode=offline")
        return mode
    if has_api_key(env):
        return "online"
    if enabled == "true":
        raise ConfigError("logging.wandb.enabled: true needs a W&B API key (run `wandb login` or set WANDB_API_KEY); "
                          "use enabled=auto or mode=offline to log offline")
    return "offline"


def has_api_key(env: dict[str, str] | None = None) -> bool:
    """Whether a W&B key is configured (WANDB_API_KEY, an identity token file, or ~/.netrc); never reads it out."""
    env = os.environ if env is None else env
    if env.get("WANDB_API_KEY") or env.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(env.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    try:
        return netrc.netrc(env.get("NETRC") or None).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_run_id(run_dir: str | Path, fixed: str | None = None) -> tuple[str, bool]:
    """(id, resumed): the run dir's W&B run id (logging.wandb.id if set, else created on the first start), kept in
    wandb_id.txt so that resumes continue the same W&B run."""
    path = Path(run_dir) / WANDB_ID_FILE
    stored = path.read_text().strip() if path.is_file() else ""
    if stored and (fixed is None or stored == fixed):
        return stored, True
    alphabet = string.ascii_lowercase + string.digits
    run_id = fixed or "".join(secrets.choice(alphabet) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id, False


def latest_checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint folder of a run (Ray Train's <run_dir>/checkpoint_<time>, spawn's
    checkpoints/step_*), checked against its manifests; None if there is none."""
    from dtrain.engine.checkpoint import CheckpointError, checkpoint_order, pick_checkpoint

    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    found += [p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()]
    try:
        return pick_checkpoint(sorted(found, key=checkpoint_order, reverse=True), warn=False)
    except CheckpointError:
        return None


class WandbSink:
    """One W&B run per dtrain run dir, created by rank 0 only; resumed dtrain runs continue the same W&B run id."""

    def __init__(self, run_dir: Path, job: dict[str, Any], cfg: dict[str, Any], mode: str) -> None:
        import wandb  # lazily: only a job that logs to W&B pays for importing it

        self.run_dir, self.cfg, self.mode = run_dir, cfg, mode
        self.every = cfg.get("log_every_n_steps") or 1
        run_id, resumed = wandb_run_id(run_dir, cfg.get("id"))
        try:
            self.run = wandb.init(
                project=cfg.get("project") or "dtrain", entity=cfg.get("entity"), group=cfg.get("group"),
                name=cfg.get("name") or job.get("name"), tags=list(cfg.get("tags") or []), job_type="train",
                id=run_id, resume="allow", config=job, mode=mode,
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
                # console="off": worker output already goes to Ray's logs; silent: we print the one hint ourselves.
                settings=wandb.Settings(console="off", silent=True))
        except Exception as err:  # the network or W&B service can fail; metrics.jsonl is the record that matters
            raise ConfigError(f"logging.wandb: could not start a W&B run ({str(err).splitlines()[0]}); "
                              "set logging.wandb.mode=offline or enabled=false") from None
        self.folder = Path(self.run.dir).parent
        self._print_hint(resumed)

    def _print_hint(self, resumed: bool) -> None:
        if self.mode == "online":
            print(f"[dtrain] W&B run {self.run.id}: {self.run.url}", flush=True)
            return
        sync = f"wandb sync --append {self.folder}" if resumed else f"wandb sync {self.folder}"
        note = " (continues an earlier offline folder: sync that one first)" if resumed else ""
        print(f"[dtrain] W&B offline run {self.run.id}{note}; upload later with: {sync}", flush=True)

    def log(self, record: dict[str, Any]) -> None:
        """Send one dtrain event to W&B (see the module docstring for the mapping)."""
        event, step = record.get("event"), record.get("step")
        if event == "step" and step % self.every == 0:
            self.run.log(_numbers(record, skip=("step", "time")), step=step)
        elif event == "epoch":
            values = _numbers(record, skip=("step", "time"))
            self.run.log({(f"{k}_epoch" if k.startswith("train/") else k): v for k, v in values.items()}, step=step)
        elif event == "end":
            self._summarize(record)
            if self.cfg.get("log_checkpoint"):
                self._log_checkpoint(record)

    def _summarize(self, record: dict[str, Any]) -> None:
        summary = dict(_numbers(record.get("test") or {}))
        summary |= {f"best/{k}": v for k, v in (record.get("best") or {}).items() if isinstance(v, int | float | str)}
        summary |= {k: record[k] for k in ("steps", "wall_time_s", "train_samples_per_s", "stop_reason",
                                           "skipped_steps", "world_size") if k in record}
        self.run.summary.update(summary)

    def _log_checkpoint(self, record: dict[str, Any]) -> None:
        import wandb

        folder = latest_checkpoint_dir(self.run_dir)
        if folder is None:
            print("[dtrain] W&B: no intact checkpoint to upload (checkpoint.every_n_epochs=0?)", flush=True)
            return
        step = _checkpoint_step(folder)
        if step is not None and step != record.get("steps"):
            print(f"[dtrain] W&B: the latest checkpoint is from step {step}, training ended at step "
                  f"{record.get('steps')}", flush=True)
        artifact = wandb.Artifact(f"checkpoint-{self.run.id}", type="model",
                                  metadata={"step": step, "final_step": record.get("steps"), "folder": folder.name})
        artifact.add_dir(str(folder))
        self.run.log_artifact(artifact, aliases=["latest", "final"] if step == record.get("steps") else ["latest"])

    def finish(self, failed: bool = False) -> None:
        """Finish the run; failed runs are marked with exit code 1."""
        import wandb

        self.run.finish(exit_code=1 if failed else 0)
        # Spawned and Ray worker processes may exit without atexit hooks: stop W&B's service process now.
        wandb.teardown()


def _numbers(record: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, float]:
    return {k: v for k, v in record.items()
            if k not in skip and isinstance(v, int | float) and not isinstance(v, bool)}


def _checkpoint_step(folder: Path) -> int | None:
    from dtrain.engine.checkpoint import read_manifest

    step = (read_manifest(folder, 0) or {}).get("step")
    return step if isinstance(step, int) else None


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All events of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
