"""DeepSpeed as a drop-in for DDP on CPU (gloo, 2 ranks): same trajectory at ZeRO-0, every stage trains, ZeRO shards
what it promises (measured inside the workers), native checkpoints resume exactly and give back fp32 weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from dtrain.config import build_job, load_job, to_objects
from dtrain.data import load_data
from dtrain.engine.callbacks import StateBytes
from dtrain.engine.strategies.deepspeed import TAG
from dtrain.engine.strategies.deepspeed_config import deepspeed_config
from dtrain.errors import ConfigError
from dtrain.launch.spawn import spawn_workers
from dtrain.launch.worker import build_worker
from dtrain.models import build_model
from dtrain.tracking import read_metrics
from tests.helpers import JOBS, small_job

pytestmark = pytest.mark.slow

# 1294 training samples / (32 x 2 ranks) = 21 micro-batches per epoch, accumulated in pairs: 11 steps per epoch, the
# last one from a single micro-batch (the loop owns the windows; DeepSpeed must sum exactly what it is given).
# A 256-wide hidden layer so that the sharded state is mostly weights (19k parameters), not padding. Checkpoints
# every epoch; the resume tests restart from epoch 1, one at another worker count (the global batch is fixed).
BASE = {"model.hidden": "[256]", "trainer.max_epochs": 2, "trainer.log_every_n_steps": 1, "trainer.grad_clip": 1.0,
        "trainer.grad_accum": 2, "data.global_batch_size": 128, "optim.lr": 0.003, "optim.scheduler": "cosine",
        "optim.warmup_steps": 3}
STEPS = 22


def _job(**over) -> dict:
    return small_job(**{**BASE, **over})


def _ds(stage: int, **over) -> dict:
    return _job(**{"trainer.strategy": "deepspeed", "trainer.deepspeed.zero_stage": stage, **over})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs on demand, each once per module (so each test's time holds at most two): "ddp" or "zero<stage>", fp32,
    2 epochs, each rank writing what it holds after its first step."""
    root = tmp_path_factory.mktemp("deepspeed")
    done: dict = {"root": root}

    def get(name: str) -> dict:
        if name not in done:
            job = _job() if name == "ddp" else _ds(int(name.removeprefix("zero")))
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("TORCH_EXTENSIONS_DIR", str(root / "torch_extensions"))  # where a JIT-built op would go
                summary = spawn_workers(job, root / name, world=2, callbacks=[StateBytes(root / name / "memory")])
                done[name] = {"summary": summary, "dir": root / name, "job": job}
        return done[name]

    get.root = root
    return get


def _steps(run_dir) -> list[dict]:
    return [e for e in read_metrics(run_dir) if e["event"] == "step"]


def _memory(run) -> list[dict]:
    return [json.loads((run["dir"] / "memory" / f"rank{r}.json").read_text()) for r in range(2)]


def test_zero0_follows_the_ddp_trajectory(runs):
    ddp, zero0 = _steps(runs("ddp")["dir"]), _steps(runs("zero0")["dir"])
    assert len(ddp) == len(zero0) == STEPS
    for a, b in zip(ddp, zero0, strict=True):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4, abs=1e-5)
        # the gradient norm (measured in DeepSpeed's clipping hook, before clipping, like DDP's) and the schedule match
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-6)
    assert runs("zero0")["summary"]["test"]["test/acc"] == pytest.approx(runs("ddp")["summary"]["test"]["test/acc"],
                                                                       abs=0.01)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_every_zero_stage_trains(runs, stage):
    run = runs(f"zero{stage}")
    steps = _steps(run["dir"])
    assert len(steps) == STEPS and run["summary"]["skipped_steps"] == 0
    assert all(0 < s["train/grad_norm"] < 100 for s in steps)
    first, last = sum(s["train/loss"] for s in steps[:4]), sum(s["train/loss"] for s in steps[-4:])
    assert last < 0.6 * first
    assert run["summary"]["test"]["test/acc"] > 0.7  # 10 classes; 2 short epochs
    # ZeRO only changes where the state lives, not the arithmetic: the trajectory stays DDP's
    ddp = _steps(runs("ddp")["dir"])
    assert [s["train/loss"] for s in steps] == pytest.approx([s["train/loss"] for s in ddp], rel=1e-3, abs=1e-4)


def test_cpu_training_compiles_no_deepspeed_op(runs):
    """DeepSpeed's CPU backend would JIT-compile its shared-memory all-reduce (inference only; 40-60 s on a fresh
    machine) when it starts: dtrain skips it, and training's collectives go through gloo."""
    from deepspeed.accelerator import get_accelerator

    runs("zero1")
    built = runs.root / "torch_extensions"
    assert get_accelerator().device_name() != "cpu" or not built.exists() or not any(built.iterdir())


def test_per_rank_state_shrinks_as_zero_promises(runs):
    mem = {s: _memory(runs(f"zero{s}")) for s in range(4)}
    n = mem[0][0]["num_params"]
    assert n > 15_000 and all(m["num_params"] == n for s in mem for m in mem[s])

    def close(value, expected):  # a few bytes more: Adam's step counters, ZeRO's alignment padding
        return expected <= value <= expected * 1.01 + 64

    for rank in range(2):
        z0, z1, z2, z3 = (mem[s][rank] for s in range(4))
        # ZeRO-0: every rank holds everything: Adam's two fp32 moments, fp32 gradients and weights
        assert close(z0["optimizer_state_bytes"], 2 * 4 * n)
        assert z0["grad_bytes"] == z0["param_bytes"] == 4 * n
        # stage 1 partitions the optimizer state, 2 also the gradients, 3 also the weights: each rank holds half
        for z in (z1, z2, z3):
            assert close(z["optimizer_state_bytes"], 2 * 4 * n / 2)
        for z in (z2, z3):
            assert close(z["grad_bytes"], 4 * n / 2)
        assert z1["param_bytes"] == z2["param_bytes"] == 4 * n
        assert close(z3["param_bytes"], z0["param_bytes"] / 2)


def test_checkpoint_recovers_fp32_weights_with_zero_to_fp32(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    for stage in (2, 3):
        run = runs(f"zero{stage}")
        folder = run["dir"] / "checkpoints" / "step_00000022" / "deepspeed"
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=TAG)
        job = to_objects(run["job"])
        data = load_data(job.data)
        model = build_model(job.model, data.meta)
        model.load_state_dict(state, strict=True)
        assert all(t.dtype == torch.float32 for t in state.values())
        with torch.no_grad():
            acc = model(data.test).metrics["acc"].item()
        assert acc == pytest.approx(run["summary"]["test"]["test/acc"], abs=1e-6)


def test_resume_continues_the_same_run(runs):
    """Restart the ZeRO-3 run from its epoch-1 checkpoint: epoch 2 replays exactly."""
    full = runs("zero3")
    resumed = runs.root / "zero3-resumed"
    shutil.copytree(full["dir"] / "checkpoints" / "step_00000011", resumed / "checkpoints" / "step_00000011")
    summary = spawn_workers(full["job"], resumed, world=2, resume=True)
    assert [e["step"] for e in read_metrics(resumed) if e["event"] == "resume"] == [11]
    again, before = _steps(resumed), _steps(full["dir"])[11:]
    assert [s["step"] for s in again] == list(range(12, 23))
    assert [s["train/loss"] for s in again] == pytest.approx([s["train/loss"] for s in before], rel=1e-6)
    assert [s["lr"] for s in again] == pytest.approx([s["lr"] for s in before], rel=1e-9)
    assert summary["test"]["test/acc"] == pytest.approx(full["summary"]["test"]["test/acc"], abs=1e-9)


def test_resume_at_another_world_size_goes_through_a_universal_checkpoint(runs):
    """The ZeRO-3 run's epoch-1 checkpoint, its optimizer state sharded for 2 ranks, resumed by 1 rank: DeepSpeed's
    universal checkpoint (converted on resume, then removed) regroups it, and with the global batch fixed epoch 2
    takes the same steps at the same learning rates to the same test loss, up to float32 reduction order."""
    import tempfile
    from pathlib import Path

    full = runs("zero3")
    resumed = runs.root / "zero3-at-1"
    shutil.copytree(full["dir"] / "checkpoints" / "step_00000011", resumed / "checkpoints" / "step_00000011")
    summary = spawn_workers(full["job"], resumed, world=1, resume=True)
    assert [e["step"] for e in read_metrics(resumed) if e["event"] == "resume"] == [11]
    assert summary["world_size"] == 1 and summary["steps"] == STEPS
    again, before = _steps(resumed), _steps(full["dir"])[11:]
    assert [s["lr"] for s in again] == pytest.approx([s["lr"] for s in before], rel=1e-9)
    assert summary["test"]["test/loss"] == pytest.approx(full["summary"]["test"]["test/loss"], rel=1e-6)
    assert not list(Path(tempfile.gettempdir()).glob("dtrain-universal-*"))


def _config(**over) -> dict:
    """deepspeed_config of the trainer section of a ZeRO-0 job with these overrides."""
    t = to_objects(build_job(OmegaConf.create(_ds(0, **over)))).trainer
    return _translated(t)


def _translated(t, **batch) -> dict:
    return deepspeed_config(t.deepspeed, precision=t.precision, grad_clip=t.grad_clip, grad_clip_mode=t.grad_clip_mode,
                            grad_accum=t.grad_accum, **batch)


def test_translated_config():
    t = to_objects(build_job(OmegaConf.create(_ds(3, **{
        "trainer.deepspeed.offload_optimizer": True, "trainer.precision": "bf16-mixed", "trainer.grad_accum": 4,
        "trainer.deepspeed.config": "{zero_optimization: {reduce_bucket_size: 1000}}"})))).trainer
    cfg = _translated(t, micro_batch=32, world=2)
    assert cfg["train_micro_batch_size_per_gpu"] == 32 and cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 256 and cfg["gradient_clipping"] == 1.0
    assert cfg["bf16"]["enabled"] and not cfg["fp16"]["enabled"]
    assert cfg["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"}, "reduce_bucket_size": 1000}


@pytest.mark.parametrize(("raw", "message"), [
    ("{gradient_clipping: 0.5}", "trainer.deepspeed.config.gradient_clipping: 0.5 conflicts with 1.0 set by "
                                 "trainer.grad_clip; set it in one place"),
    ("{zero_optimization: {stage: 2}}", "trainer.deepspeed.config.zero_optimization.stage: 2 conflicts with 0 set by "
                                        "trainer.deepspeed.zero_stage"),
    ("{bf16: {enabled: true}}", "trainer.deepspeed.config.bf16.enabled: True conflicts with False set by "
                                "trainer.precision"),
    ("{optimizer: {type: Adam}}", "trainer.deepspeed.config.optimizer: not allowed, it is set by optim.*"),
    # DeepSpeed's own parser, at load time: a misspelt key, a mistyped value
    ("{zero_optimization: {overlap_com: true}}", "trainer.deepspeed.config.zero_optimization.overlap_com: DeepSpeed "
                                                 "rejects it: Extra inputs are not permitted"),
    ("{zero_optimization: {reduce_bucket_size: big}}", "trainer.deepspeed.config.zero_optimization.reduce_bucket_size: "
                                                       "DeepSpeed rejects it: Input should be a valid integer"),
    # the section with the bad value is named, not the first one with a key of that name
    ("{flops_profiler: {enabled: false}, comms_logger: {enabled: [1]}}", "trainer.deepspeed.config.comms_logger."
                                                                         "enabled: DeepSpeed rejects it: Input should "
                                                                         "be a valid boolean"),
    ("{flops_profiler: {enabled: maybe}}", "trainer.deepspeed.config: DeepSpeed rejects it: unsupported operand"),
])
def test_conflicting_raw_keys_are_one_line_config_errors(raw, message):
    with pytest.raises(ConfigError) as err:
        _config(**{"trainer.deepspeed.config": raw})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_conflicts_are_caught_when_the_job_loads():
    with pytest.raises(ConfigError, match="trainer.deepspeed.config.gradient_clipping: 0.5 conflicts"):
        load_job(JOBS / "mlp_digits_deepspeed.yaml", ["trainer.deepspeed.config={gradient_clipping: 0.5}"])
    # raw keys that only tune DeepSpeed pass through, and equal values are no conflict
    job = load_job(JOBS / "mlp_digits_deepspeed.yaml", ["trainer.deepspeed.config={gradient_clipping: 1.0, "
                                                        "zero_optimization: {reduce_bucket_size: 5000}}"])
    assert _translated(to_objects(job).trainer)["zero_optimization"]["reduce_bucket_size"] == 5000


def _setup(job: dict):
    worker = build_worker(to_objects(job), torch.device("cpu"))
    worker.strategy.setup(worker.model, 1e-3, 10, 10)


def test_staged_model_under_zero3_is_a_config_error():
    job = load_job(JOBS / "dbn_digits.yaml", ["trainer.strategy=deepspeed", "trainer.deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="trainer.deepspeed.zero_stage: a staged model .* runs under ZeRO 0-2"):
        _setup(OmegaConf.to_container(job))


def test_a_combination_only_deepspeeds_engine_refuses_is_a_config_error(tmp_path):
    # Only deepspeed.initialize checks this one (ZeRO 1 cannot overlap its reduction when the loop owns accumulation)
    job = _ds(1, **{"trainer.deepspeed.config": "{zero_optimization: {overlap_comm: true}}", "trainer.max_epochs": 1})
    with pytest.raises(ConfigError, match=r"^trainer.deepspeed.config: DeepSpeed rejects it: .*overlap_comm only with "
                                          r"ZeRO stage 2$"):
        spawn_workers(job, tmp_path, world=2)


def test_fp16_without_accelerator_support_is_a_config_error():
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this accelerator has fp16; the error is for DeepSpeed's CPU backend")
    with pytest.raises(ConfigError, match="trainer.precision: fp16-mixed is not supported by DeepSpeed on cpu"):
        _setup(_ds(0, **{"trainer.precision": "fp16-mixed"}))
