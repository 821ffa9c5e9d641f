"""DeepSpeed as a drop-in for DDP: the job's settings become a DeepSpeed config, DeepSpeed owns clipping, loss
scaling, ZeRO partitioning and checkpoints (its native format), and the loop keeps owning batching and accumulation
windows. deepspeed itself is imported in setup(), when the strategy is used."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dtrain.compat import deepspeed as ds_compat
from dtrain.compat.torch import persistent_buffers
from dtrain.engine import dist
from dtrain.engine.checkpoint import read_manifest
from dtrain.engine.optim import build_optimizer, build_scheduler, retarget, trainable
from dtrain.engine.strategies.base import StepResult, StrategySetup
from dtrain.engine.strategies.deepspeed_config import DeepSpeedOptions, deepspeed_config
from dtrain.engine.strategies.grads import all_finite, clip, nonfinite, same_device_and_dtype, total_norm
from dtrain.errors import ConfigError, first_line

CHECKPOINT_DIR = "deepspeed"
"""Sub-folder of a dtrain checkpoint that holds DeepSpeed's own checkpoint (engine.save_checkpoint)."""
TAG = "state"
"""The DeepSpeed checkpoint tag (one per dtrain checkpoint folder, so a fixed name is enough)."""


class _CastInputs(nn.Module):
    """What the loop calls: casts the model input (first batch tensor) to the engine's low-precision dtype.

    Targets (the other batch tensors) stay in full precision because the models compute their losses in float32.
    """

    def __init__(self, engine: nn.Module, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.engine, self.dtype = engine, dtype

    def forward(self, batch: tuple[Tensor, ...]) -> Any:
        if self.dtype is not None and batch and batch[0].is_floating_point():
            batch = (batch[0].to(self.dtype), *batch[1:])
        return self.engine(batch)


class DeepSpeedStrategy:
    """deepspeed.initialize around the model; backward/step through the engine; native DeepSpeed checkpoints."""

    Options: ClassVar[type | None] = DeepSpeedOptions

    def __init__(self, setup: StrategySetup, options: DeepSpeedOptions | None = None) -> None:
        self.cfg, self.device, self.precision = setup, setup.device, setup.precision
        self.options = options or DeepSpeedOptions()
        self.dtype = self.precision.dtype
        self.engine: Any = None

    @classmethod
    def check(cls, options: DeepSpeedOptions, *, compile: bool = False, activation_checkpointing: bool = False,
              **trainer: Any) -> None:
        """The translated config, and DeepSpeed's own parser on raw keys: conflicts fail when the job loads."""
        for key, wanted in (("compile", compile), ("activation_checkpointing", activation_checkpointing)):
            if wanted:  # DeepSpeed's engine wraps the module its own way (ZeRO-3 hooks, its own compile)
                raise ConfigError(f"trainer.{key}: not supported under trainer.strategy=deepspeed; use ddp or fsdp")
        deepspeed_config(options, **trainer)

    def setup(self, model: nn.Module, lr: float, total_steps: int, steps_per_epoch: int) -> nn.Module:
        import deepspeed  # imported here: it is slow to import and only needed under this strategy
        from deepspeed.accelerator import get_accelerator

        if self.engine is None and self.options.zero_stage == 3 and len(model.stages()) > 1:
            # set_stage (run by the loop before setup) rearranges weights, which ZeRO-3 keeps partitioned away
            raise ConfigError("trainer.deepspeed.zero_stage: a staged model (layer-wise pre-training) runs under "
                              "ZeRO 0-2, got 3")
        if self.engine is not None:  # a later stage of a staged model: start from the full fp32 weights again
            model = self._release(model)
        if self.dtype == torch.float16 and not get_accelerator().is_fp16_supported():
            raise ConfigError(f"trainer.precision: fp16-mixed is not supported by DeepSpeed on "
                              f"{get_accelerator().device_name()}; use bf16-mixed or 32")
        config = deepspeed_config(self.options, precision=self.precision.kind, grad_clip=self.cfg.grad_clip,
                                  grad_clip_mode=self.cfg.grad_clip_mode, grad_accum=self.cfg.accum,
                                  micro_batch=self.cfg.micro_batch, world=dist.world_size())
        _quiet_deepspeed()
        ds_compat.skip_shared_memory_comm_op()
        # Ray Train and torchrun set LOCAL_RANK, which DeepSpeed insists on; a local spawn is a single node.
        os.environ.setdefault("LOCAL_RANK", str(dist.rank()))
        model = model.to(self.device)
        # Fused, as under DDP: ZeRO steps it on this rank's fp32 partition like any torch optimizer.
        optimizer = build_optimizer(trainable(model), self.cfg.optim, lr, fused=True)
        plain_fp32 = self.dtype is None and config["zero_optimization"]["stage"] == 0
        if plain_fp32 and not config["gradient_clipping"]:
            config["gradient_clipping"] = float("inf")  # so DeepSpeed takes its clipping path, where we measure
        try:
            self.engine, *_ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=config, dist_init_required=False,
                lr_scheduler=lambda opt: build_scheduler(opt, self.cfg.optim, total_steps, steps_per_epoch))
        except AssertionError as err:  # the engine's own sanity checks, which the load-time parse cannot run
            if not self.options.config:
                raise  # dtrain's translated config alone: not the user's mistake
            raise ConfigError(f"trainer.deepspeed.config: DeepSpeed rejects it: {first_line(err)}") from None
        if plain_fp32:
            self._measure_norm_when_clipping()
        self.optimizer = ds_compat.torch_optimizer(self.engine)
        self.scheduler = self.engine.lr_scheduler
        return _CastInputs(self.engine, self.dtype)

    def autocast(self) -> ContextManager:
        # DeepSpeed keeps the weights themselves in bf16/fp16; autocast also lets tensors a model creates itself
        # (float32 by default, e.g. initial hidden states) meet those weights in matmuls and convolutions.
        return self.precision.autocast()

    def no_sync(self, enabled: bool) -> ContextManager:
        # With managed_gradient_accumulation=false DeepSpeed reduces at step() (ZeRO 0/1) or reduce-scatters in
        # every backward (ZeRO 2/3, which cannot defer it): nothing to switch off here.
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        # The loop already weighted the loss by its share of the step: DeepSpeed must sum micro-batch gradients.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, loss: Tensor) -> StepResult:
        # DeepSpeed itself decides on the host whether to apply the step: ZeRO 1-3 and its bf16/fp16 optimizers read
        # their overflow check back (one read-back per step that dtrain cannot remove); fp32 ZeRO-0 reads nothing.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()  # a device tensor, or a float DeepSpeed already has on the host
        if not isinstance(norm, Tensor):
            norm = torch.tensor(float("nan") if norm is None else norm, device=self.device)
        if self.dtype == torch.float16 or self.engine.was_step_applied():
            # An fp16 overflow is the loss scaler's business, as under DDP. Where DeepSpeed has no overflow check
            # (fp32, ZeRO-0) it applied the step regardless: a non-finite loss still counts towards stopping.
            return StepResult(norm, nonfinite(loss))
        return StepResult(norm, torch.ones((), device=self.device))

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def retarget(self, lr: float) -> None:
        retarget(self.scheduler.optimizer, self.scheduler, self.cfg.optim, lr)

    def weights_finite(self) -> bool:
        """Each rank checks what it holds (its ZeRO-3 partition, else the whole model); one all-reduce agrees."""
        held = [ds_compat.local_tensor(p) for p in self.engine.module.parameters()]
        bad = 1.0 - all_finite(held, self.device)
        return float(dist.all_reduce_sum(bad)) == 0.0

    def snapshot(self, folder: Path) -> Callable[[], None]:
        # Every rank writes its own shard files into its own folder; merged (by Ray or the spawn launcher) they form
        # one DeepSpeed checkpoint directory that engine.load_checkpoint and zero_to_fp32 both read. DeepSpeed
        # writes them itself, now: its partitioned state has no cheap copy to write later.
        self.engine.save_checkpoint(str(folder / CHECKPOINT_DIR), tag=TAG)
        return lambda: None

    def load(self, folder: Path) -> None:
        path = folder / CHECKPOINT_DIR
        if not path.is_dir():
            raise ConfigError(f"{folder}: not a DeepSpeed checkpoint (no {CHECKPOINT_DIR}/ folder); resume it with "
                              "the strategy that wrote it")
        manifest = read_manifest(folder) or {}
        partitioned = any((path / TAG).glob("*optim_states.pt"))  # ZeRO 1-3 or bf16: per-rank optimizer shards
        if manifest.get("world", dist.world_size()) == dist.world_size() or not partitioned:
            self._load(path, TAG)
            return
        # Shards cut for another world size: DeepSpeed's universal checkpoint (per parameter) loads at this one.
        with _universal(path / TAG, manifest) as universal:
            ds_compat.load_universal(self.engine, True)
            try:
                self._load(universal.parent, universal.name)
            finally:
                ds_compat.load_universal(self.engine, False)

    def _load(self, path: Path, tag: str) -> None:
        loaded, _ = self.engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise ConfigError(f"{path}: DeepSpeed could not load the checkpoint")

    def full_state_dict(self) -> dict[str, Tensor]:
        """Full float32 weights and buffers on every rank (a collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module, out = self.engine.module, {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:
                with _gathered(p):
                    full = p.detach().clone()
            out[name] = full.float().cpu()
        for name, buf in persistent_buffers(module):
            out[name] = buf.detach().clone().cpu()
        return out

    def load_full_state_dict(self, state: dict[str, Tensor]) -> bool:
        """Into the module's weights (cast to their bf16/fp16 where DeepSpeed keeps them so). Not under ZeRO-3, whose
        weights live in partitions that only its own checkpoint loading fills."""
        if self.options.zero_stage == 3:
            return False
        self.engine.module.load_state_dict(state)
        return True

    def _release(self, model: nn.Module) -> nn.Module:
        """Hand a model back from the old engine as plain float32 parameters (keeping each one's requires_grad)."""
        full = self.full_state_dict()
        self.engine.destroy()
        self.engine = None
        for mod_name, mod in model.named_modules():
            for name, p in list(mod.named_parameters(recurse=False)):
                key = f"{mod_name}.{name}" if mod_name else name
                setattr(mod, name, nn.Parameter(full[key].to(self.device), requires_grad=p.requires_grad))
        return model

    def _measure_norm_when_clipping(self) -> None:
        """DeepSpeed computes no gradient norm for fp32 ZeRO-0 (the torch optimizer steps as is): its clipping hook,
        which runs on the all-reduced gradients, measures the total norm here and clips with it.

        DeepSpeed's own clip_grad_norm_ would do the same with a norm kernel per tensor and an all-reduce of the norm
        across ranks (an average of equal values: every rank holds the same reduced gradients; it exists for
        mixture-of-experts layers, which the catalog has none of), one more blocking collective every step.
        """
        engine = self.engine
        params = trainable(engine.module)
        same = same_device_and_dtype(params)

        def clip_and_measure() -> Tensor:
            norm = total_norm([p.grad for p in params if p.grad is not None], engine.device, same)
            threshold = engine.gradient_clipping()
            clip(params, threshold if threshold != float("inf") else None, "norm", norm)
            return norm

        ds_compat.replace_fp32_clipping(engine, clip_and_measure)


@contextlib.contextmanager
def _universal(tag_folder: Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """tag_folder converted to a universal checkpoint once per node, by its local rank 0, into the node's temp
    folder under a name taken from the checkpoint's manifest (the same on every node, whichever local copy of the
    checkpoint each rank reads); every rank of the node reads it, and it is removed once all have."""
    key = hashlib.sha1(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / f"dtrain-universal-{key}" / tag_folder.name
    converts = int(os.environ.get("LOCAL_RANK", dist.rank())) == 0
    failure: BaseException | None = None
    if converts:
        shutil.rmtree(dest.parent, ignore_errors=True)
        try:
            ds_compat.to_universal(tag_folder, dest)
        except Exception as err:  # noqa: BLE001 - raised below, after the other ranks are released
            failure = err
    dist.barrier()
    try:
        if failure is not None or not dest.is_dir():
            raise ConfigError(f"{tag_folder}: DeepSpeed's conversion to a universal checkpoint (to resume at "
                              f"{dist.world_size()} workers) failed: {first_line(failure) if failure else 'no output'}")
        yield dest
    finally:
        dist.barrier()
        if converts:
            shutil.rmtree(dest.parent, ignore_errors=True)


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every phase of initialize at INFO; the loop reports what matters."""
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # DeepSpeed still calls the deprecated collective in ZeRO-3; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)


def _gathered(p: nn.Parameter) -> ContextManager:
    if ds_compat.is_partitioned(p):  # a ZeRO-3 partitioned parameter: gather it on every rank
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=None)
    return contextlib.nullcontext()
