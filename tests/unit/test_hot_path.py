"""The training step never waits for the device: between logged steps dtrain reads no tensor back.

On a GPU every device-to-host transfer (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.numpy()`, `.cpu()`, a
`copy_` into a CPU tensor, a Python `if` on a tensor) stalls the host until the queued kernels finish, so the next
step cannot be launched while the current one runs. Each catalog model's job trains one epoch per stage at two batch
sizes (4x as many steps at the smaller one) with step logging off, under DDP and under DeepSpeed ZeRO 0-3, counting
every such transfer and where it came from (dtrain's code, DeepSpeed's, torch's): dtrain's must not grow with the
number of steps (under FSDP too). DeepSpeed's own are counted too: ZeRO 1-3 decide on the host whether a step overflowed
(is_invalid_grad_norm inside DeepSpeed's optimizer: twice a step at ZeRO 1-2, once at ZeRO 3), which dtrain cannot
remove; fp32 ZeRO-0 reads nothing back. The DeepSpeed and FSDP runs (2 spawned ranks each) count instead
what one epoch's steps add after its first few.
On a GPU the same runs count every synchronising CUDA call that torch.cuda.set_sync_debug_mode reports.
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from dtrain.compat.torch import dispatch_mode
from dtrain.config import load_job, to_dict
from dtrain.engine.callbacks import Callback
from dtrain.launch.spawn import LocalPublisher, spawn_workers
from dtrain.launch.worker import run_worker
from tests.helpers import JOBS, ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

READ_BACK = torch.ops.aten._local_scalar_dense.default  # what item(), float(), int() and bool() of a tensor run
COPY = torch.ops.aten.copy_.default
PYTHON_READS = ("tolist", "numpy", "cpu")  # read back without passing torch's dispatcher on a CPU tensor

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
DEEPSPEED = ["trainer.strategy=deepspeed", "trainer.grad_clip=1.0"]
DTRAIN, DEEPSPEED_DIR = str(ROOT / "dtrain"), str(Path(__import__("deepspeed").__file__).parent)


def _origin() -> str:
    """Whose code asked for the transfer: the innermost frame in dtrain, DeepSpeed or elsewhere (torch)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(DTRAIN):
            return f"dtrain {Path(name).relative_to(DTRAIN)}:{frame.f_code.co_name}"
        if name.startswith(DEEPSPEED_DIR):
            return f"deepspeed {Path(name).relative_to(DEEPSPEED_DIR)}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "other"


class CountTransfers(dispatch_mode()):
    """Counts device-to-host transfers by origin: scalar reads and D2H copies at torch's dispatcher, plus the
    Tensor methods that read back without passing it on a CPU tensor."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        for name in PYTHON_READS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(getattr(torch.Tensor, name)))

    def _counted(self, method):
        def read(tensor, *args, **kwargs):
            self.counts[_origin()] += 1
            return method(tensor, *args, **kwargs)

        return read

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is READ_BACK or func is COPY and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            self.counts[_origin()] += 1
        return func(*args, **(kwargs or {}))


class TransferProbe(Callback):
    """CountTransfers inside each spawned rank, from the model's set-up on; after every step it writes that rank's
    counts after each step so far to folder/rank<r>.json (DeepSpeed keeps process-wide state, so each run needs
    fresh processes)."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.counter, self.history = folder, None, {}

    def on_setup(self, strategy, model, rank: int) -> None:
        if self.counter is None:
            self.counter = CountTransfers(pytest.MonkeyPatch())  # this process ends with the run: never undone
            self.counter.__enter__()

    def on_step_end(self, state, rank: int) -> None:
        self.history[state.step] = dict(self.counter.counts)
        (self.folder / f"rank{rank}.json").write_text(json.dumps(self.history))


def _job(job_file: str, batch_size: int, tmp_path, extra: list[str]) -> dict:
    return to_dict(load_job(JOBS / job_file, [
        f"runs_dir={tmp_path}", "name=h", "logging.progress=false", "logging.wandb.enabled=false",
        "checkpoint.every_n_epochs=0", "trainer.max_epochs=1", "trainer.num_workers=1",
        "trainer.log_every_n_steps=100000", f"data.batch_size={batch_size}", *JOB_FILES.get(job_file, []), *extra]))


def _transfers(job_file: str, batch_size: int, tmp_path, monkeypatch, extra: list[str] = ()) -> tuple[Counter, int]:
    """(transfers by origin, optimizer steps) of one epoch per stage of the job, as one worker on the CPU."""
    run = tmp_path / str(batch_size)
    job = _job(job_file, batch_size, tmp_path, list(extra))
    with monkeypatch.context() as patch, CountTransfers(patch) as counter:
        summary = run_worker(job, run, LocalPublisher(run), torch.device("cpu"))
    return counter.counts, summary["steps"]


def _growth(few: Counter, many: Counter) -> dict[str, int]:
    return {k: many[k] - few[k] for k in many.keys() | few.keys() if many[k] != few[k]}


@pytest.mark.parametrize("job_file", sorted(JOB_FILES))
def test_a_ddp_training_step_reads_nothing_back_from_the_device(job_file, tmp_path, monkeypatch):
    few, few_steps = _transfers(job_file, 64, tmp_path, monkeypatch)
    many, many_steps = _transfers(job_file, 16, tmp_path, monkeypatch)
    assert many_steps >= 3 * few_steps > 0
    assert _growth(few, many) == {}, f"read-backs that grow with the steps ({many_steps - few_steps} more steps)"


SETTLED = 4
"""Steps after which a spawned run's read-backs are counted: the first ones may set things up."""


def _spawned_growth(tmp_path, extra: list[str]) -> tuple[list[dict[str, int]], int]:
    """(transfers by origin that each of 2 spawned ranks made between step SETTLED and the epoch's last step, how
    many steps that is) in one epoch of the MLP job: no epoch end, logged step or checkpoint lies between."""
    job = _job("mlp_digits.yaml", 16, tmp_path, ["trainer.num_workers=2", *extra])
    summary = spawn_workers(job, tmp_path, world=2, callbacks=[TransferProbe(tmp_path)])
    growth = []
    for rank in range(2):
        history = json.loads((tmp_path / f"rank{rank}.json").read_text())
        growth.append(_growth(Counter(history[str(SETTLED)]), Counter(history[str(summary["steps"])])))
    return growth, summary["steps"] - SETTLED


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "deepspeeds_own"), [(0, 0), (1, 2), (2, 2), (3, 1)])
def test_a_deepspeed_training_step_reads_back_only_what_deepspeed_itself_does(stage, deepspeeds_own, tmp_path):
    growth, steps = _spawned_growth(tmp_path, [*DEEPSPEED, f"trainer.deepspeed.zero_stage={stage}"])
    assert steps >= 30
    for rank in range(2):
        assert {k: v for k, v in growth[rank].items() if not k.startswith("deepspeed ")} == {}
        # DeepSpeed's own overflow check: exactly this many read-backs per step, inside its ZeRO optimizer
        assert sum(growth[rank].values()) == deepspeeds_own * steps, growth[rank]


@pytest.mark.slow
def test_an_fsdp_training_step_reads_nothing_back(tmp_path):
    """Sharded gradients: their norm is all-reduced, clipped and the skip decided on the device, as under DDP."""
    growth, steps = _spawned_growth(tmp_path, ["trainer.strategy=fsdp", "trainer.grad_clip=1.0",
                                               "trainer.grad_accum=2"])
    assert steps >= 10
    assert growth == [{}, {}], f"{steps} steps"


def test_the_counter_sees_every_kind_of_read_back(monkeypatch):
    t = torch.ones(3) * 2
    with monkeypatch.context() as patch, CountTransfers(patch) as counter:
        t.sum().item(), float(t[0]), bool(t[1] > 0), t.tolist(), t.numpy(), t.cpu()
        torch.zeros(3).copy_(t)  # CPU to CPU: not a transfer
    assert sum(counter.counts.values()) == 6 and set(counter.counts) == {"other"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("job_file", sorted(JOB_FILES))
def test_a_training_step_never_synchronises_the_gpu(job_file, tmp_path):
    def syncs(batch_size: int) -> tuple[int, int]:
        run = tmp_path / str(batch_size)
        job = _job(job_file, batch_size, tmp_path, [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")  # a warning for every call that synchronises with the GPU
            try:
                summary = run_worker(job, run, LocalPublisher(run), torch.device("cuda"))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), summary["steps"]

    few, few_steps = syncs(64)
    many, many_steps = syncs(16)
    assert many_steps >= 3 * few_steps > 0
    assert many == few, f"{many - few} more GPU synchronisations for {many_steps - few_steps} more steps"
