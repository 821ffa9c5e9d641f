"""`dtrain submit` and `dtrain jobs`: submissions to a Ray cluster through the Ray Jobs API, token auth included."""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from dtrain.compat.ray import V2_ENABLED_ENV, quiet_upload_logs, state_api_get
from dtrain.errors import DtrainError, first_line
from dtrain.launch.project import project_dir

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Not shipped to the cluster: environments, results, caches, VCS data.
EXCLUDES = [".venv", "venv", "runs", ".git", "wandb", "__pycache__", "*.pyc", ".pytest_cache", ".ruff_cache",
            "*.egg-info", "build", "dist"]
SPEC_DIR = ".dtrain-submit"  # where a job spec from outside the project travels inside the working_dir
FORWARDED_ENV = ("WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY")  # local settings worth keeping on the cluster
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def find_token() -> tuple[str | None, str]:
    """The cluster token and where it came from: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(token_path).expanduser() if token_path else Path.home() / ".ray" / "auth_token"
    if token_path and not path.is_file():
        raise DtrainError(f"RAY_AUTH_TOKEN_PATH: {path} does not exist; expected a file holding the Ray token")
    if path.is_file():
        token = path.read_text().strip()
        if token:
            return token, str(path)
    return None, "nowhere"


def cluster_address(address: str | None) -> str:
    """The Jobs API URL: --address, else RAY_API_SERVER_ADDRESS / RAY_ADDRESS if it is an http URL, else local."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not address and os.environ.get("RAY_ADDRESS", "").startswith("http"):
        address = os.environ["RAY_ADDRESS"]
    address = (address or DEFAULT_ADDRESS).rstrip("/")
    return address if "://" in address else f"http://{address}"


def connect(address: str | None = None):
    """A JobSubmissionClient for the cluster's dashboard, sending the token when one is found."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = cluster_address(address)
    token, source = find_token()
    # Our own header: Ray only adds one itself when this process runs with RAY_AUTH_MODE=token.
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(url, headers=headers)
    except AuthenticationError as err:
        if str(err).startswith("Authentication required"):
            raise DtrainError(f"--address {url}: the cluster requires a token and none was found; set RAY_AUTH_TOKEN "
                              "or put it in ~/.ray/auth_token (`ray get-auth-token` on the head)") from None
        raise DtrainError(f"--address {url}: the cluster rejected the token from {source}") from None
    except (ConnectionError, ValueError, OSError) as err:
        raise DtrainError(f"--address {url}: no Ray dashboard answers there ({first_line(err)}); "
                          "expected http://HEAD:8265") from None
    except RuntimeError as err:
        raise DtrainError(f"--address {url}: not a Ray Jobs API ({first_line(err)})") from None


def code_root() -> Path:
    """The project directory that holds the dtrain package (the repo root in a source checkout)."""
    return Path(__file__).resolve().parents[2]


def stage_code(spec: Path, workdir: Path) -> str:
    """Copy the code (minus EXCLUDES) into workdir; return the spec's path relative to it. The code is the job
    file's own project (see project.project_dir) with dtrain's package beside it when that project is not dtrain's:
    on the cluster the user's modules import from the working dir as they do here."""
    root, project = code_root(), project_dir(spec)
    ignore = shutil.ignore_patterns(*EXCLUDES)
    if project is not None and project != root:
        shutil.copytree(project, workdir, ignore=ignore, dirs_exist_ok=True)
        if not (workdir / "dtrain").exists():
            shutil.copytree(root / "dtrain", workdir / "dtrain", ignore=ignore)
        root = project
    elif (root / "pyproject.toml").is_file():
        shutil.copytree(root, workdir, ignore=ignore, dirs_exist_ok=True)
    else:  # an installed package: ship just the package
        shutil.copytree(root / "dtrain", workdir / "dtrain", ignore=ignore, dirs_exist_ok=True)
    spec = spec.resolve()
    if spec.is_relative_to(root) and (workdir / spec.relative_to(root)).is_file():
        return spec.relative_to(root).as_posix()
    (workdir / SPEC_DIR).mkdir(exist_ok=True)
    shutil.copy2(spec, workdir / SPEC_DIR / spec.name)
    return f"{SPEC_DIR}/{spec.name}"


def entrypoint_for(command: str, spec: str, overrides: list[str], name: str, options: list[str] = ()) -> str:
    """The shell command the cluster runs: `python -m dtrain <command> SPEC OVERRIDES name=NAME --address auto`
    (then options, e.g. preflight's --memory-limit). NAME is the job's resolved name: it replaces a name= among the
    overrides rather than following it."""
    args = [spec, *(o for o in overrides if not o.startswith("name=")), f"name={name}", "--address", "auto", *options]
    return f"python -m dtrain {command} " + " ".join(shlex.quote(a) for a in args)


def default_command(job: DictConfig) -> str:
    """What the cluster runs for this job: `tune` when the spec has a tune section, else `train`."""
    return "tune" if job.get("tune") is not None else "train"


def submit(job: DictConfig, spec: str | Path, overrides: list[str], *, address: str | None = None,
           command: str | None = None, options: list[str] = ()) -> str:
    """Submit job (loaded from spec with overrides) to the cluster; returns the submission id. options: more
    arguments of the command (after --address auto)."""

    from ray.exceptions import AuthenticationError

    command = command or default_command(job)
    client = connect(address)
    quiet_upload_logs()
    env = {V2_ENABLED_ENV: "1", "PYTHONUNBUFFERED": "1"}
    env.update({k: os.environ[k] for k in FORWARDED_ENV if k in os.environ})
    with tempfile.TemporaryDirectory(prefix="dtrain-submit-") as tmp:
        workdir = Path(tmp) / "code"
        rel_spec = stage_code(Path(spec), workdir)
        try:
            # Ray zips and uploads working_dir during this call, so the staging copy can go afterwards.
            return client.submit_job(
                entrypoint=entrypoint_for(command, rel_spec, overrides, job.name, options),
                runtime_env={"working_dir": str(workdir), "excludes": EXCLUDES, "env_vars": env},
                metadata={"dtrain_name": str(job.name), "dtrain_command": command},
            )
        except (AuthenticationError, RuntimeError) as err:
            raise DtrainError(f"submit to {cluster_address(address)} failed: {first_line(err)}") from None


def _call(client, method: str, job_id: str, *args):
    """client.<method>(job_id) with Ray's 'no such job' turned into a one-line DtrainError."""
    try:
        return getattr(client, method)(job_id, *args)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise DtrainError(f"job {job_id}: no such job on {client.get_address()}") from None
        raise DtrainError(f"job {job_id}: {first_line(err)}") from None


def status(client, job_id: str) -> Any:
    """The job's JobDetails (status, message, metadata, entrypoint, times)."""
    return _call(client, "get_job_info", job_id)


def logs(client, job_id: str) -> str:
    """Everything the job's driver printed so far."""
    return _call(client, "get_job_logs", job_id)


def follow(client, job_id: str, out=sys.stdout) -> str:
    """Stream the job's logs to out until it ends; returns its final status."""
    status(client, job_id)  # fail fast on an unknown id

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError:  # the stream closed early (head restarted, network): fall back to polling
        pass
    except KeyboardInterrupt:
        print(f"\n[dtrain] stopped following; job {job_id} keeps running (dtrain jobs stop {job_id} ends it)",
              file=sys.stderr)
        raise
    return wait(client, job_id, timeout=None)


def wait(client, job_id: str, timeout: float | None = 60.0, poll: float = 0.5) -> str:
    """Poll until the job reaches a terminal status (or timeout seconds pass); returns the last status."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = str(status(client, job_id).status)
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll)


def stop(client, job_id: str, timeout: float = 60.0) -> str:
    """Ask the cluster to stop the job and wait for it to end; returns its final status."""
    _call(client, "stop_job", job_id)
    return wait(client, job_id, timeout=timeout)


def worker_nodes(client, job_id: str, actor_class: str = "RayTrainWorker") -> list[str]:
    """Node ids the job's training workers ran on, one per worker (Ray's state API keeps ended actors a while)."""
    return [a["node_id"] for a in job_actors(client, job_id, actor_class)]


def job_actors(client, job_id: str, actor_class: str = "RayTrainWorker", detail: bool = False) -> list[dict]:
    """The job's actors of one class from the cluster's state API (with detail: state, pid, ...); [] before its
    driver starts."""
    ray_job_id = status(client, job_id).job_id
    if not ray_job_id:  # the driver has not started yet
        return []
    query = (f"filter_keys=job_id&filter_predicates=%3D&filter_values={ray_job_id}&limit=10000"
             f"&detail={str(detail).lower()}")
    r = state_api_get(client, f"/api/v0/actors?{query}")
    if r.status_code != 200:
        raise DtrainError(f"job {job_id}: the state API answered {r.status_code}: {r.text.strip()[:200]}")
    return [a for a in r.json()["data"]["result"]["result"] if a["class_name"] == actor_class]


def list_jobs(client) -> list[Any]:
    """All jobs the cluster knows (submitted ones and drivers), oldest first."""
    from ray.exceptions import AuthenticationError

    try:
        jobs = client.list_jobs()
    except (AuthenticationError, RuntimeError) as err:
        raise DtrainError(f"listing jobs on {client.get_address()} failed: {first_line(err)}") from None
    return sorted(jobs, key=lambda j: j.start_time or 0)


def describe(info: Any) -> str:
    """One line for a job: id, status, dtrain run name, start time, and Ray's message for ended jobs."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.start_time / 1000)) if info.start_time else "-"
    name = (info.metadata or {}).get("dtrain_name", "-")
    line = f"{info.submission_id or info.job_id}  {str(info.status):9s}  {name}  {started}"
    if str(info.status) in TERMINAL and info.message:
        line += f"  ({info.message.strip().splitlines()[0]})"
    return line
