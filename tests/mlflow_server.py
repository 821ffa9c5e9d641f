"""A real MLflow tracking server (SQLite backend, local artifact root) on 127.0.0.1, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from dtrain.launch.net import free_port


@contextlib.contextmanager
def running_mlflow_server(root: Path, timeout_s: float = 90) -> Iterator[str]:
    """Start `mlflow server` with its database and artifacts in root; yields its URI; stops it (and its children)
    on exit."""
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts")]
    with open(root / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, start_new_session=True,
                                env={**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
                                     # no job runner (its consumer processes run MLflow's own jobs, not tracking)
                                     "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        try:
            uri = f"http://127.0.0.1:{port}"
            _wait_healthy(proc, uri, root, timeout_s)
            yield uri
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is the server and its children
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_healthy(proc: subprocess.Popen, uri: str, root: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.3)
