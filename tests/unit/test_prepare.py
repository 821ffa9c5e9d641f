"""trainer.activation_checkpointing and trainer.compile (engine/prepare.py), one process: checkpointed layers keep
only their inputs and recompute the rest in the backward, with the same gradients; compile compiles what it says
(the whole model, or each block under FSDP) and a compiled DDP run follows the eager one."""

from __future__ import annotations

import pytest
import torch

from dtrain.compat.torch import is_compiled
from dtrain.config import load_job, to_dict, to_objects
from dtrain.engine.prepare import CompileOptions, prepare_model
from dtrain.errors import ConfigError
from dtrain.launch.spawn import LocalPublisher
from dtrain.launch.worker import build_worker, run_worker
from dtrain.models import build_model
from dtrain.models.base import DataMeta
from dtrain.tracking import read_metrics
from tests.helpers import JOBS

pytestmark = pytest.mark.usefixtures("one_thread")
META = DataMeta(input_shape=(64,), num_classes=10)


def _mlp():
    job = to_objects(load_job(JOBS / "mlp_digits.yaml", ["model.hidden=[128,128]"]))
    torch.manual_seed(0)
    return build_model(job.model, META)


def _saved_bytes_and_grads(model) -> tuple[int, list[torch.Tensor]]:
    """Bytes autograd keeps for the backward during one forward, and the gradients of that forward's loss."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    batch = (torch.rand(256, 64), torch.randint(0, 10, (256,)))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(batch).loss
    loss.backward()
    return sum(saved), [p.grad.clone() for p in model.parameters()]


def test_checkpointed_layers_keep_less_and_give_the_same_gradients():
    plain_bytes, plain_grads = _saved_bytes_and_grads(_mlp())
    recomputed = prepare_model(_mlp(), None, True)  # the MLP's one top-level layer: net
    saved_bytes, grads = _saved_bytes_and_grads(recomputed)
    # only net's input (256 x 64 floats) and the loss's own tensors stay; the 128-wide activations are recomputed
    assert saved_bytes < plain_bytes / 3
    for a, b in zip(plain_grads, grads, strict=True):
        assert torch.equal(a, b)
    named = prepare_model(_mlp(), None, ["net"])  # by name: the layers inside run again in the backward
    calls = []
    named.net[1].register_forward_hook(lambda *args: calls.append(1))
    assert _saved_bytes_and_grads(named)[0] == saved_bytes and len(calls) == 2
    with torch.no_grad():  # evaluation keeps nothing, so nothing is recomputed either
        named((torch.rand(4, 64), torch.zeros(4, dtype=torch.long)))
    assert len(calls) == 3


def test_an_unknown_layer_name_is_one_line():
    with pytest.raises(ConfigError, match=r"^trainer.activation_checkpointing: no layer 'nett' in model MLP \(its "
                                          r"top-level layers: net\)$"):
        prepare_model(_mlp(), None, ["nett"])


def test_compile_compiles_the_model_or_each_block():
    whole = prepare_model(_mlp(), CompileOptions(), False)
    assert is_compiled(whole) and not any(is_compiled(m) for m in whole.shard_blocks())
    per_block = prepare_model(_mlp(), CompileOptions(), False, per_block=True)
    assert not is_compiled(per_block) and len(per_block.shard_blocks()) == 3
    assert all(is_compiled(m) for m in per_block.shard_blocks())
    again = prepare_model(per_block, CompileOptions(backend="eager"), True)  # a later stage: prepared once only
    assert again is per_block and all(is_compiled(m) for m in per_block.shard_blocks())


def _run(tmp_path, name: str, extra: list[str]) -> list[dict]:
    job = to_dict(load_job(JOBS / "mlp_digits.yaml", [
        f"runs_dir={tmp_path}", f"name={name}", "logging.progress=false", "logging.wandb.enabled=false",
        "checkpoint.every_n_epochs=0", "trainer.max_steps=4", "trainer.log_every_n_steps=1", "trainer.num_workers=1",
        "data.val_fraction=0.05", "data.test_fraction=0.05", "model.dropout=0", *extra]))
    run_worker(job, tmp_path / name, LocalPublisher(tmp_path / name), torch.device("cpu"))
    return [e for e in read_metrics(tmp_path / name) if e["event"] == "step"]


@pytest.mark.slow
def test_a_compiled_ddp_run_follows_eager(tmp_path):
    """inductor's fused kernels round differently from eager's: losses within 1e-5 relative (measured ~1e-7).
    Without dropout: compiled dropout draws its masks from another generator."""
    eager = _run(tmp_path, "eager", [])
    compiled = _run(tmp_path, "compiled", ["trainer.compile={mode: default}"])
    assert len(compiled) == len(eager) == 4
    assert [s["train/loss"] for s in compiled] == pytest.approx([s["train/loss"] for s in eager], rel=1e-5)


def test_build_worker_passes_the_settings_to_the_strategy():
    job = to_objects(load_job(JOBS / "mlp_digits.yaml", ["trainer.compile={fullgraph: true}",
                                                         "trainer.activation_checkpointing=[net]"]))
    setup = build_worker(job, torch.device("cpu")).strategy.cfg
    assert setup.compile == CompileOptions(fullgraph=True) and setup.activation_checkpointing == ["net"]
