"""Shared fixtures: offline W&B, a restored environment, no leaked process group, one Ray per session."""

from __future__ import annotations

import os

import pytest

from dtrain.launch.net import free_port

# Tests start their own Ray: a head a developer keeps with `dtrain up` must not be used (tests/ray/test_local_head.py
# points this at its own folder).
os.environ["DTRAIN_LOCAL_HEAD_DIR"] = "/nonexistent/dtrain-tests"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
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

S3_ENDPOINT = os.environ.get("DTRAIN_TEST_S3_ENDPOINT") or f"http://127.0.0.1:{free_port()}"
os.environ.update(FAKE_AWS, AWS_ENDPOINT_URL=S3_ENDPOINT, DTRAIN_TEST_S3_ENDPOINT=S3_ENDPOINT)


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
