"""The training step never waits for the device: between logged steps the host reads no tensor back.

On a GPU every read-back (`.item()`, `float(t)`, `bool(t)`, a Python `if` on a tensor) stalls the host until the
queued kernels finish, so the next step cannot be launched while the current one runs. Each catalog model's job
trains one epoch per stage at two batch sizes (4x as many steps at the smaller one) with step logging off,
counting the read-backs torch dispatches (on the CPU) and, on a GPU, every synchronising CUDA call that
torch.cuda.set_sync_debug_mode reports: the counts must not grow with the number of steps.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dtrain.config import load_job, to_dict
from dtrain.engine.spawn import LocalReporter
from dtrain.engine.worker import run_worker
from tests.helpers import JOBS

pytestmark = pytest.mark.usefixtures("one_thread")

READ_BACK = torch.ops.aten._local_scalar_dense.default  # what item(), float(), int() and bool() of a tensor run

JOB_FILES = {
    "perceptron_breast_cancer.yaml": [],
    "mlp_digits.yaml": ["trainer.grad_clip=1.0", "model.dropout=0.2"],
    "cnn_digits.yaml": [],
    "rnn_adding.yaml": ["data.options.n_samples=512"],
    "lstm_sunspots.yaml": [],
    "autoencoder_digits.yaml": [],
    "deep_autoencoder_digits.yaml": ["model.pretrain_epochs=null", "model.finetune_epochs=null"],
    "rbm_digits.yaml": [],
    "dbn_digits.yaml": ["model.pretrain_epochs=null", "model.finetune_epochs=null"],
    "som_digits.yaml": [],
}


class CountReadBacks(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is READ_BACK
        return func(*args, **(kwargs or {}))


def _read_backs(job_file: str, batch_size: int, tmp_path, device: str = "cpu") -> tuple[int, int]:
    """(read-backs, optimizer steps) of one epoch per stage of the job, as one worker on device."""
    job = load_job(JOBS / job_file, [f"runs_dir={tmp_path}", "name=h", "logging.progress=false",
                                     "logging.wandb.enabled=false", "checkpoint.every_n_epochs=0",
                                     "trainer.max_epochs=1", "trainer.num_workers=1",
                                     "trainer.log_every_n_steps=100000", f"data.batch_size={batch_size}",
                                     *JOB_FILES[job_file]])
    run = tmp_path / str(batch_size)
    if device == "cpu":
        with CountReadBacks() as counter:
            summary = run_worker(to_dict(job), run, LocalReporter(run), torch.device(device))
        return counter.count, summary["steps"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # a warning for every call that synchronises with the GPU
        try:
            summary = run_worker(to_dict(job), run, LocalReporter(run), torch.device(device))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught), summary["steps"]


@pytest.mark.parametrize("job_file", sorted(JOB_FILES))
def test_a_training_step_reads_nothing_back_from_the_device(job_file, tmp_path):
    few, few_steps = _read_backs(job_file, 64, tmp_path)
    many, many_steps = _read_backs(job_file, 16, tmp_path)
    assert many_steps >= 3 * few_steps > 0
    assert many == few, f"{many - few} more read-backs for {many_steps - few_steps} more steps"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("job_file", sorted(JOB_FILES))
def test_a_training_step_never_synchronises_the_gpu(job_file, tmp_path):
    few, few_steps = _read_backs(job_file, 64, tmp_path / "few", "cuda")
    many, many_steps = _read_backs(job_file, 16, tmp_path / "many", "cuda")
    assert many_steps >= 3 * few_steps > 0
    assert many == few, f"{many - few} more GPU synchronisations for {many_steps - few_steps} more steps"
