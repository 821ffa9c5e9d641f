"""`dtrain up` / `dtrain down`: one Ray head kept running on this machine between runs.

Starting Ray is most of a short local run's start-up. `dtrain up` starts a head once (`ray start --head --block`,
listening on 127.0.0.1 only, token authentication on); `dtrain train` and `dtrain tune` without `--address` attach
to it while it runs, and start their own embedded Ray when it does not. `dtrain down` stops it, and only it.
The head's pid, address and log live in `state_dir()`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from dtrain.compat import ray as ray_compat
from dtrain.errors import DtrainError
from dtrain.launch import net

STATE_ENV = "DTRAIN_LOCAL_HEAD_DIR"
"""Where the head's pid, address, log and Ray temp dir live (default /tmp/dtrain-<uid>; keep it short: Ray puts
unix sockets under it)."""
START_TIMEOUT_S = 120
STOP_GRACE_S = 30


def state_dir() -> Path:
    return Path(os.environ.get(STATE_ENV) or f"/tmp/dtrain-{os.getuid()}")


def running_address() -> str | None:
    """The running head's GCS address (127.0.0.1:PORT), or None when no head started by `dtrain up` is alive."""
    folder = state_dir()
    try:
        pid = int((folder / "head.pid").read_text())
        address = (folder / "address").read_text().strip()
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    parts = net.host_port(address)
    return address if parts is not None and net.answers(*parts) else None


def up(num_cpus: int | None = None, num_gpus: int | None = None) -> str:
    """Start the head unless one runs; returns its address."""
    if address := running_address():
        return address
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if ray is None:
        raise DtrainError("dtrain up: the `ray` command was not found next to this Python")
    # SIGTERM makes a Ray node drain before it stops, for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (30 s by default),
    # and a head never finishes draining, so `dtrain down` would wait it out: this head stops at once instead, as
    # `ray stop` does (a run still on it stops as after a crash and continues with --resume).
    env = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **os.environ, "RAY_AUTH_MODE": "token",
           ray_compat.LOOPBACK_ENV: "0"}
    if not (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")):
        subprocess.run([ray, "get-auth-token", "--generate"], env=env, capture_output=True, check=True)
    port, dashboard_port = net.free_port(), net.free_port()
    log = folder / "head.log"
    cmd = [ray, "start", "--head", "--block", f"--port={port}", f"--num-cpus={num_cpus or os.cpu_count() or 1}",
           f"--temp-dir={folder / 'ray'}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard_port}", "--disable-usage-stats"]
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    with log.open("w") as out:  # the head outlives this process: its own session, its output to the log
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_TIMEOUT_S
    while "Ray runtime started" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc.pid)
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:])
            raise DtrainError(f"dtrain up: Ray's head did not start (log: {log}):\n{tail}")
        time.sleep(0.25)
    address = f"127.0.0.1:{port}"
    (folder / "address").write_text(address + "\n")
    (folder / "head.pid").write_text(f"{proc.pid}\n")
    return address


def down() -> bool:
    """Stop the head `dtrain up` started; False when none was running."""
    folder = state_dir()
    try:
        pid = int((folder / "head.pid").read_text())
    except (OSError, ValueError):
        return False
    running = _alive(pid)
    if running:
        _stop(pid)
    for name in ("head.pid", "address"):
        (folder / name).unlink(missing_ok=True)
    return running


def _stop(pid: int) -> None:
    """SIGTERM the `ray start --block` process (it shuts its node down), SIGKILL its session after the grace."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_GRACE_S
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child not yet reaped) is not alive
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True

