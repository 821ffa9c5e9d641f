"""Shared fixtures: offline W&B, a restored environment, no leaked process group, one Ray per session."""

from __future__ import annotations

import os

import pytest

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

    from dtrain.launch.net import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
