"""Shared fixtures: offline W&B, a restored environment, no leaked process group, one Ray per session."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

import pytest

from dtrain.launch.net import free_port

# Tests start their own Ray: a head a developer keeps with `dtrain up` must not be used (tests/ray/test_local_head.py
# points this at its own folder).
os.environ["DTRAIN_LOCAL_HEAD_DIR"] = "/nonexistent/dtrain-tests"


# Tests that start Ray clusters of their own, on their own ports and folders, not the session's Ray.
OWN_CLUSTER_MODULES = {"test_jobs_cluster.py", "test_local_head.py"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(items):
    """Under pytest-xdist (`make test XDIST='-n 2 --dist loadgroup'`), the tests that use the session's Ray
    (ray_session, and the rest of tests/ray) form one group, run by one process one after another, so there is one
    such Ray; the tests that start clusters of their own form another; the remaining tests are shared out."""
    for item in items:
        if item.path.name in OWN_CLUSTER_MODULES:
            item.add_marker(pytest.mark.xdist_group("own-clusters"))
        elif "ray_session" in item.fixturenames or item.path.parent.name == "ray":
            item.add_marker(pytest.mark.xdist_group("ray"))


def pytest_collection_finish(session):
    """The groups must hold: two session Rays side by side would contend and fail in ways that name no cause."""
    if session.config.getoption("loadgroup", False) and any(
            "@" not in item.nodeid for item in session.items if item.get_closest_marker("xdist_group")):
        raise pytest.UsageError("pytest-xdist's --dist loadgroup did not group the tests: this pytest ignores the "
                                "node ids it renames (see the test extra in pyproject.toml)")


@contextlib.contextmanager
def _turn(alone: bool):
    """Under pytest-xdist: a test marked `alone` (its assertions time the machine) waits for the tests running in
    the other processes to end, and none starts there until it has ended. A readers-writer lock on two files: an
    `alone` test first takes `intent`, so that no test starts meanwhile, then `turn` for itself; any other test
    passes through `intent` and shares `turn`."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # one process: nothing runs beside the test
        yield
        return
    folder = Path(tempfile.gettempdir()) / f"dtrain-tests-{run}"
    folder.mkdir(exist_ok=True)
    with open(folder / "intent", "a") as intent, open(folder / "turn", "a") as turn:
        if alone:
            fcntl.flock(intent, fcntl.LOCK_EX)
            fcntl.flock(turn, fcntl.LOCK_EX)
        else:
            fcntl.flock(intent, fcntl.LOCK_SH)
            fcntl.flock(turn, fcntl.LOCK_SH)
            fcntl.flock(intent, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
            fcntl.flock(intent, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _isolated_env(request, monkeypatch, tmp_path):
    """Each test: offline W&B, the environment restored, no process group left behind, its turn (see _turn)."""
    with _turn(request.node.get_closest_marker("alone") is not None):
        saved = dict(os.environ)
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
        monkeypatch.setenv("WANDB_DIR", str(tmp_path))
        yield
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
            from dtrain.compat.deepspeed import forget_process_groups

            forget_process_groups()  # the next test's in-process DeepSpeed engine must not use this test's group
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def ray_session():
    """A single-node Ray bound to 127.0.0.1, started once for the whole test session."""
    from dtrain.launch.train import init_ray

    os.environ.setdefault("WANDB_MODE", "offline")
    init_ray(None, num_cpus=4)
    import ray

    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """Tiny models in-process: intra-op threads only add overhead and contention with other tests."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_rank():
    """A process group of one (gloo on 127.0.0.1), which DeepSpeed needs even alone; torn down after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


# An S3-compatible server (moto's) on 127.0.0.1 for the object-storage tests, with fake credentials. The variables
# are set when the suite starts, so that a Ray started by any test gives them to its workers; the server itself
# starts with the first test that asks for it (the `s3` fixture).
FAKE_AWS = {"AWS_ACCESS_KEY_ID": "DTRAINFAKEACCESSKEY0", "AWS_SECRET_ACCESS_KEY": "dtrain-fake-secret-9f3c1d77",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

# Under pytest-xdist each test process has its own server: the key names the process (gw0, gw1), whose Ray workers
# and subprocesses inherit it.
_S3_KEY = "DTRAIN_TEST_S3_ENDPOINT" + os.environ.get("PYTEST_XDIST_WORKER", "")
S3_ENDPOINT = os.environ.get(_S3_KEY) or f"http://127.0.0.1:{free_port()}"
os.environ.update(FAKE_AWS, AWS_ENDPOINT_URL=S3_ENDPOINT, **{_S3_KEY: S3_ENDPOINT})


@pytest.fixture(scope="session")
def s3():
    """moto_server on S3_ENDPOINT with a bucket `dtrain-test`; yields a pyarrow S3FileSystem on it."""
    import shutil
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from pyarrow.fs import S3FileSystem

    port = S3_ENDPOINT.rsplit(":", 1)[1]
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", port], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(S3_ENDPOINT, timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto_server did not start on {S3_ENDPOINT}") from None
            time.sleep(0.2)
    fs = S3FileSystem(endpoint_override=S3_ENDPOINT, allow_bucket_creation=True)
    fs.create_dir("dtrain-test")
    yield fs
    proc.kill()
    proc.wait()
