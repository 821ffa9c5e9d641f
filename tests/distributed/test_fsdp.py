"""FSDP2 on CPU (gloo, 2 ranks): the same trajectory and weights as DDP (staged models too), half the state per rank
(measured inside the workers), sharded checkpoints that resume bitwise at the same world size and correctly at
another, a plain state dict in one line, and activation checkpointing and torch.compile that change nothing but
speed and memory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dtrain.compat.torch import is_compiled
from dtrain.config import load_job, to_dict, to_objects
from dtrain.data import load_data
from dtrain.engine.callbacks import Callback, StateBytes
from dtrain.engine.checkpoint import safe_load
from dtrain.launch.spawn import spawn_workers
from dtrain.models import build_model
from dtrain.tracking import read_metrics
from tests.helpers import JOBS, small_job

pytestmark = pytest.mark.slow

# The ZeRO test's job (tests/distributed/test_deepspeed.py): 11 steps per epoch from 21 micro-batches accumulated in
# pairs (the last step from one), clipping, a cosine schedule with warm-up; a checkpoint every epoch.
BASE = {"model.hidden": "[256]", "trainer.max_epochs": 2, "trainer.log_every_n_steps": 1, "trainer.grad_clip": 1.0,
        "trainer.grad_accum": 2, "optim.lr": 0.003, "optim.scheduler": "cosine", "optim.warmup_steps": 3}
STEPS = 22
# FSDP reduce-scatters what DDP all-reduces and sums the norm from shards: the same float32 sums in another order.
# Measured: losses and weights agree to ~2e-7 relative after 22 steps; the bounds leave 50x room.
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


class Prepared(Callback):
    """Writes rank<r>.json into folder at set-up: the model's compiled modules and those whose forward runs under
    activation checkpointing (the latter get their own forward attribute)."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_setup(self, strategy, model, rank: int) -> None:
        modules = dict(model.named_modules())
        found = {"compiled": [n for n, m in modules.items() if is_compiled(m)],
                 "checkpointed": [n for n, m in modules.items() if "forward" in vars(m)]}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{rank}.json").write_text(json.dumps(found))


class FullWeights(Callback):
    """After the last step, every rank gathers the full weights (strategy.full_state_dict, a collective); rank 0
    saves them to path."""

    def __init__(self, path) -> None:
        self.path, self.strategy = path, None

    def on_setup(self, strategy, model, rank: int) -> None:
        self.strategy = strategy

    def on_step_end(self, state, rank: int) -> None:
        if state.step == STEPS:
            full = self.strategy.full_state_dict()
            if rank == 0:
                torch.save(full, self.path)


def _job(**over) -> dict:
    return small_job(**{**BASE, **over})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs on demand, each once per module: name -> job overrides. Each rank writes what it holds after its first
    step (StateBytes)."""
    root = tmp_path_factory.mktemp("fsdp")
    done: dict = {}
    jobs = {"ddp": {}, "fsdp": {"trainer.strategy": "fsdp"},
            "fsdp-recompute": {"trainer.strategy": "fsdp", "trainer.activation_checkpointing": True},
            # compiling takes most of a minute on 2 cores: 4 steps are enough to compare
            "fsdp-compiled": {"trainer.strategy": "fsdp", "trainer.compile": True, "trainer.max_steps": 4,
                              "checkpoint.every_n_epochs": 0}}

    def get(name: str) -> dict:
        if name not in done:
            job = _job(**jobs[name])
            summary = spawn_workers(job, root / name, world=2, callbacks=[StateBytes(root / name / "memory"),
                                                                          Prepared(root / name / "prepared"),
                                                                          FullWeights(root / name / "full.pt")])
            done[name] = {"summary": summary, "dir": root / name, "job": job}
        return done[name]

    get.root = root
    return get


def _steps(run_dir) -> list[dict]:
    return [e for e in read_metrics(run_dir) if e["event"] == "step"]


def _plain_state_dict(checkpoint, tmp_path) -> dict:
    """The documented one-liner (README): a DCP folder -> one torch.save file -> the model's own state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint / "fsdp", tmp_path / "full.pt")
    return torch.load(tmp_path / "full.pt", weights_only=True)["model"]


def test_fsdp_follows_the_ddp_trajectory_and_weights(runs, tmp_path):
    ddp, fsdp = _steps(runs("ddp")["dir"]), _steps(runs("fsdp")["dir"])
    assert len(ddp) == len(fsdp) == STEPS
    for a, b in zip(ddp, fsdp, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=LOSS_RTOL)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=LOSS_RTOL)
        assert b["lr"] == a["lr"]
    last = "checkpoints/step_00000022"
    ddp_weights = safe_load(runs("ddp")["dir"] / last / "model.pt")["model"]
    fsdp_weights = _plain_state_dict(runs("fsdp")["dir"] / last, tmp_path)
    assert set(fsdp_weights) == set(ddp_weights)
    for key, value in ddp_weights.items():
        torch.testing.assert_close(fsdp_weights[key], value, rtol=0, atol=WEIGHT_ATOL)
    gathered = torch.load(runs("fsdp")["dir"] / "full.pt", weights_only=True)  # full_state_dict() in the workers
    assert gathered.keys() == fsdp_weights.keys() and all(gathered[k].equal(v) for k, v in fsdp_weights.items())
    assert runs("fsdp")["summary"]["test"]["test/acc"] == pytest.approx(runs("ddp")["summary"]["test"]["test/acc"],
                                                                      abs=1e-3)


def _memory(run) -> list[dict]:
    return [json.loads((run["dir"] / "memory" / f"rank{r}.json").read_text()) for r in range(2)]


def test_each_rank_holds_half_of_what_ddp_holds(runs):
    ddp, fsdp = _memory(runs("ddp")), _memory(runs("fsdp"))
    n = ddp[0]["num_params"]
    assert n > 15_000 and all(m["num_params"] == n for m in ddp + fsdp)
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes"):
        assert ddp[0][key] == ddp[1][key] >= 4 * n
        # every element is held by exactly one rank (rows split evenly; an odd row count leaves one extra row)
        assert sum(m[key] for m in fsdp) == pytest.approx(ddp[0][key], abs=64)
        assert all(m[key] <= ddp[0][key] / 2 * 1.02 + 64 for m in fsdp)


def test_resume_at_the_same_world_size_is_bitwise(runs, tmp_path):
    full = runs("fsdp")
    shutil.copytree(full["dir"] / "checkpoints" / "step_00000011", tmp_path / "checkpoints" / "step_00000011")
    summary = spawn_workers(full["job"], tmp_path, world=2, resume=True)
    assert [e["step"] for e in read_metrics(tmp_path) if e["event"] == "resume"] == [11]
    again, before = _steps(tmp_path), _steps(full["dir"])[11:]
    assert [s["step"] for s in again] == list(range(12, 23))
    assert [s["train/loss"] for s in again] == [s["train/loss"] for s in before]
    assert summary["test"] == full["summary"]["test"]


def test_resume_at_another_world_size_continues_the_run(runs, tmp_path):
    """The 2-rank shards read by 1 rank: with the global batch kept (64 = 1 x 64 = 2 x 32) epoch 2 follows the
    2-rank run (same samples per step; only the order of float sums differs)."""
    full = runs("fsdp")
    shutil.copytree(full["dir"] / "checkpoints" / "step_00000011", tmp_path / "checkpoints" / "step_00000011")
    job = _job(**{"trainer.strategy": "fsdp", "data.batch_size": 64, "trainer.num_workers": 1})
    summary = spawn_workers(job, tmp_path, world=1, resume=True)
    again, before = _steps(tmp_path), _steps(full["dir"])[11:]
    assert [s["step"] for s in again] == list(range(12, 23))
    assert [s["train/loss"] for s in again] == pytest.approx([s["train/loss"] for s in before], rel=LOSS_RTOL)
    assert summary["test"]["test/acc"] == pytest.approx(full["summary"]["test"]["test/acc"], abs=1e-3)


def test_a_sharded_checkpoint_gives_the_catalog_models_state_dict(runs, tmp_path):
    run = runs("fsdp")
    state = _plain_state_dict(run["dir"] / "checkpoints" / "step_00000022", tmp_path)
    job = to_objects(run["job"])
    data = load_data(job.data)
    model = build_model(job.model, data.meta)
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        acc = model(data.test).metrics["acc"].item()
    assert acc == pytest.approx(run["summary"]["test"]["test/acc"], abs=1e-6)


def _prepared(run) -> list[dict]:
    return [json.loads((run["dir"] / "prepared" / f"rank{r}.json").read_text()) for r in range(2)]


def test_activation_checkpointing_changes_nothing_but_memory(runs):
    """Recomputing the forward in the backward runs the same kernels on the same inputs: equal losses."""
    assert all(p == {"compiled": [], "checkpointed": ["net"]} for p in _prepared(runs("fsdp-recompute")))
    plain, recomputed = _steps(runs("fsdp")["dir"]), _steps(runs("fsdp-recompute")["dir"])
    assert [s["train/loss"] for s in recomputed] == [s["train/loss"] for s in plain]
    assert [s["train/grad_norm"] for s in recomputed] == [s["train/grad_norm"] for s in plain]


def test_compiled_blocks_follow_eager(runs):
    """inductor's fused kernels round differently from eager's: measured ~1e-7 relative over 4 steps."""
    eager, compiled = _steps(runs("fsdp")["dir"])[:4], _steps(runs("fsdp-compiled")["dir"])
    # each block (the two Linear layers) compiled on its own, the root (loss, metrics) left eager
    assert all(p == {"compiled": ["net.1", "net.3"], "checkpointed": []} for p in _prepared(runs("fsdp-compiled")))
    assert _prepared(runs("fsdp")) == [{"compiled": [], "checkpointed": []}] * 2
    assert len(compiled) == 4
    assert [s["train/loss"] for s in compiled] == pytest.approx([s["train/loss"] for s in eager], rel=LOSS_RTOL)
    assert [s["train/grad_norm"] for s in compiled] == pytest.approx([s["train/grad_norm"] for s in eager],
                                                                     rel=LOSS_RTOL)


def _run_job(job_file: str, tmp_path, name: str, extra: list[str]) -> tuple[dict, list[dict]]:
    job = to_dict(load_job(JOBS / job_file, [f"runs_dir={tmp_path}", f"name={name}", "logging.progress=false",
                                             "logging.wandb.enabled=false", *extra]))
    summary = spawn_workers(job, tmp_path / name, world=2)
    return summary, _steps(tmp_path / name)


def test_a_staged_model_trains_as_under_ddp(tmp_path):
    """The DBN's RBM stages and fine-tuning: each stage freezes all but one layer of the sharded model (the RBMs
    read their weights outside their layers' forward, so the model is sharded whole: shard_blocks() is empty)."""
    extra = ["trainer.max_epochs=1", "model.pretrain_epochs=null", "model.finetune_epochs=null",
             "trainer.log_every_n_steps=5", "model.dropout=0"]
    ddp, ddp_steps = _run_job("dbn_digits.yaml", tmp_path, "ddp", extra)
    fsdp, fsdp_steps = _run_job("dbn_digits.yaml", tmp_path, "fsdp", [*extra, "trainer.strategy=fsdp"])
    assert fsdp["stages"] == 3 and len(fsdp_steps) == len(ddp_steps) > 10
    assert [s["train/loss"] for s in fsdp_steps] == pytest.approx([s["train/loss"] for s in ddp_steps], rel=LOSS_RTOL)
    assert fsdp["test"]["test/loss"] == pytest.approx(ddp["test"]["test/loss"], rel=LOSS_RTOL)


def test_bf16_trains(tmp_path):
    """bf16 weights gathered and computed, float32 gradients reduced and stepped."""
    summary, _ = _run_job("mlp_digits.yaml", tmp_path, "bf16", ["trainer.strategy=fsdp", "trainer.max_epochs=2",
                                                                "trainer.precision=bf16-mixed"])
    assert summary["skipped_steps"] == 0 and summary["test"]["test/acc"] > 0.85


def test_fsdp_trains_the_cnn_through_ray_on_the_data_the_driver_loaded(ray_session, tmp_path):
    """The command line's path: Ray Train workers train the CNN job under FSDP on the data the driver loaded, and
    Ray's merged checkpoint folders hold one DCP checkpoint."""
    import dataclasses

    from dtrain.launch.train import fit_job

    job = load_job(JOBS / "cnn_digits.yaml", [f"runs_dir={tmp_path}", "name=cnn", "trainer.strategy=fsdp",
                                              "logging.progress=false", "logging.wandb.enabled=false",
                                              "trainer.max_epochs=3", "model.channels=[8,16]", "model.hidden=[32]",
                                              "model.dropout=0", "optim.scheduler=none", "optim.lr=0.005"])
    # `dtrain train` loads the data once on the driver and ships it through Ray's object store: here the shipped
    # training split is cut to 1024 rows, so the workers' step count shows which data they trained on.
    full = load_data(to_objects(job).data)
    shipped = dataclasses.replace(full, train=tuple(t[:1024] for t in full.train))
    summary = fit_job(job, data=shipped)
    assert summary["world_size"] == 2 and summary["skipped_steps"] == 0
    batch = job.data.batch_size * 2
    assert summary["steps"] == 3 * 1024 // batch < 3 * len(full.train[0]) // batch
    assert summary["test"]["test/acc"] > 0.85  # chance is 0.1
    checkpoint = sorted((tmp_path / "cnn").glob("checkpoint_*/fsdp"))[-1].parent
    model = build_model(to_objects(job).model, full.meta)
    model.load_state_dict(_plain_state_dict(checkpoint, tmp_path), strict=True)
