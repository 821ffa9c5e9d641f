"""W&B: one W&B run per dtrain run dir, created by rank 0 only (wandb imported lazily, only when a job enables it)."""

from __future__ import annotations

import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dtrain.errors import ConfigError
from dtrain.tracking.base import final_checkpoint, kept_id, step_values, summary_values

WANDB_ID_FILE = "wandb_id.txt"
_LEGACY_MODES = {"dryrun": "offline", "run": "online"}


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
    stored = kept_id(path)
    if stored and (fixed is None or stored == fixed):
        return stored, True
    alphabet = string.ascii_lowercase + string.digits
    run_id = fixed or "".join(secrets.choice(alphabet) for _ in range(8))
    path.write_text(run_id + "\n")
    return run_id, False


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
        """Send one dtrain event to W&B (see dtrain.tracking.base for the mapping)."""
        at = step_values(record)
        if at is not None and (record["event"] == "epoch" or at[0] % self.every == 0):
            self.run.log(at[1], step=at[0])
        elif record.get("event") == "end":
            self.run.summary.update(summary_values(record))
            if self.cfg.get("log_checkpoint"):
                self._log_checkpoint(record)

    def _log_checkpoint(self, record: dict[str, Any]) -> None:
        import wandb

        found = final_checkpoint(self.run_dir, record, "W&B")
        if found is None:
            return
        folder, step = found
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
