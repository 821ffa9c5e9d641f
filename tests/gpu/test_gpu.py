"""GPU tests (deselected by default; run with `pytest -m gpu` on a machine with CUDA)."""

from __future__ import annotations

import pytest
import torch

from dtrain.launch.spawn import spawn_workers
from dtrain.tracking import read_metrics
from tests.helpers import small_job

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _epoch_losses(run_dir) -> list[float]:
    return [r["train/loss"] for r in read_metrics(run_dir) if r.get("event") == "epoch"]


@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_mixed_precision_trains_on_cuda(tmp_path, precision):
    job = small_job(**{"trainer.precision": precision, "trainer.max_epochs": 4, "model.hidden": "[128]"})
    summary = spawn_workers(job, tmp_path, world=1, device="cuda")
    losses = _epoch_losses(tmp_path)
    assert len(losses) == 4 and all(map(lambda v: v == v, losses)), losses
    assert losses[-1] < 0.5 * losses[0], losses
    assert summary["test"]["test/acc"] > 0.85
    assert summary["skipped_steps"] <= 2  # fp16 may skip a step or two while the loss scale settles


def test_autocast_runs_matmuls_in_the_requested_dtype():
    from dtrain.engine.precision import Precision

    layer = torch.nn.Linear(16, 16).cuda()
    for kind, dtype in (("bf16-mixed", torch.bfloat16), ("fp16-mixed", torch.float16), ("32", torch.float32)):
        with Precision(kind, torch.device("cuda")).autocast():
            assert layer(torch.randn(4, 16, device="cuda")).dtype == dtype


def test_system_metrics_and_profiler_see_the_gpu(tmp_path):
    pytest.importorskip("pynvml", reason="pip install nvidia-ml-py")
    job = small_job(**{"trainer.max_epochs": 1, "model.hidden": "[512]", "logging.system_metrics.enabled": "true",
                       "logging.system_metrics.interval_s": 0.05, "trainer.profile.enabled": "true"})
    spawn_workers(job, tmp_path, world=1, device="cuda")
    steps = [r for r in read_metrics(tmp_path) if r.get("event") == "step"]
    assert steps and all(0 < r["sys/gpu_mem_mb/rank0"] and 0 <= r["sys/gpu_util_percent/rank0"] <= 100 for r in steps)
    ops = __import__("json").loads((tmp_path / "profile" / "rank0.ops.json").read_text())["ops"]
    assert any(op["self_device_us"] > 0 for op in ops), "CUDA kernels in the profile"


def test_ddp_nccl_two_gpus(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"DDP over NCCL needs 2 GPUs, this machine has {torch.cuda.device_count()}")
    job = small_job(**{"trainer.precision": "bf16-mixed", "trainer.max_epochs": 3})
    summary = spawn_workers(job, tmp_path, world=2, device="cuda")
    losses = _epoch_losses(tmp_path)
    assert summary["world_size"] == 2
    assert losses[-1] < losses[0], losses
