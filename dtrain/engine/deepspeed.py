"""DeepSpeed as a drop-in for DDP: our config becomes a DeepSpeed config, DeepSpeed owns precision, clipping, ZeRO
partitioning and checkpoints (its native format), and the loop keeps owning batching and accumulation windows."""

from __future__ import annotations

import contextlib
import copy
import math
import os
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.engine import dist
from dtrain.engine.optim import build_optimizer, build_scheduler, trainable
from dtrain.engine.strategy import StepResult, nonfinite, same_device_and_dtype, total_norm
from dtrain.errors import ConfigError

CHECKPOINT_DIR = "deepspeed"
"""Sub-folder of a dtrain checkpoint that holds DeepSpeed's own checkpoint (engine.save_checkpoint)."""
TAG = "state"
"""The DeepSpeed checkpoint tag (one per dtrain checkpoint folder, so a fixed name is enough)."""
LOW_PRECISION = {"bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
MEMORY_ENV = "DTRAIN_DEEPSPEED_MEMORY_DIR"
"""When set, each rank writes rank<r>.json there after its first step: the bytes it holds of what ZeRO shards."""
_QUIET = 2**31 - 1  # steps_per_print: the loop reports progress, DeepSpeed's own prints would be noise

# Keys the loop must own: it calls step() at the end of each accumulation window it chose (also a shorter last
# window of an epoch), so DeepSpeed must not count micro-batches itself, and the optimizer/schedule come from optim.*.
_OWNED = {"managed_gradient_accumulation": "the training loop (it owns accumulation windows)",
          "optimizer": "optim.* (name, lr, weight_decay, momentum)",
          "scheduler": "optim.scheduler and optim.warmup_steps"}


def deepspeed_config(trainer_cfg: Any, micro_batch: int | None = None, world: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for trainer_cfg, with trainer.deepspeed.config merged on top; ConfigError on a conflict.

    Without micro_batch/world (config-load time) the batch-size keys are left out and the rest is checked, by
    DeepSpeed's own parser too when there are raw keys.
    """
    ours, sources = _translate(trainer_cfg, micro_batch, world)
    raw = dict(trainer_cfg.deepspeed.config or {})
    for key, owner in _OWNED.items():
        if key in raw:
            raise ConfigError(f"trainer.deepspeed.config.{key}: not allowed, it is set by {owner}")
    if micro_batch is None:  # batch keys are checked once the batch size is known (in each worker)
        raw = {k: v for k, v in raw.items() if k not in _BATCH_KEYS}
    merged = _merge(ours, raw, sources, "trainer.deepspeed.config")
    if micro_batch is None and raw:
        one_rank = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": trainer_cfg.grad_accum,
                    "train_batch_size": trainer_cfg.grad_accum}
        _check_with_deepspeed({**merged, **one_rank}, raw)
    return merged


def _check_with_deepspeed(config: dict[str, Any], raw: dict[str, Any]) -> None:
    """DeepSpeed's own parser on a config with raw keys, at load time: a misspelt or mistyped key (its sections are
    pydantic models that forbid unknown keys) or a combination it refuses is one ConfigError line before anything
    starts, not a traceback from every worker. Imports DeepSpeed's config module (~1 s), only for raw keys."""
    import logging

    logging.disable(logging.WARNING)  # importing DeepSpeed logs its accelerator choice: noise in a config check
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
        from pydantic import ValidationError

        DeepSpeedConfig(config)
    except ValidationError as err:  # the first bad field of one of DeepSpeed's sections
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        path = (_find_key(raw, loc[0], first["input"]) or loc[:1]) + loc[1:]
        raise ConfigError(f"trainer.deepspeed.config.{'.'.join(path)}: DeepSpeed rejects it: {first['msg']}") from None
    except (ValueError, AssertionError, TypeError) as err:  # TypeError: sections parsed by hand, e.g. flops_profiler
        raise ConfigError(f"trainer.deepspeed.config: DeepSpeed rejects it: {_first_line(err)}") from None
    finally:
        logging.disable(logging.NOTSET)


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _find_key(raw: dict[str, Any], key: str, value: Any) -> list[str] | None:
    """The path to `key` holding `value` in raw or its mappings: a section's error names the key and the bad value,
    not the section (and other sections may have a key of the same name, e.g. enabled)."""
    for k, v in raw.items():
        if k == key and v == value:
            return [k]
        if isinstance(v, dict) and (inner := _find_key(v, key, value)):
            return [k, *inner]
    return None


_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def _translate(t: Any, micro_batch: int | None, world: int | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Our trainer section in DeepSpeed's terms, and for each translated leaf the dtrain field it came from."""
    ds, stage = t.deepspeed, t.deepspeed.zero_stage
    if t.grad_clip is not None and t.grad_clip_mode != "norm":
        raise ConfigError("trainer.grad_clip_mode: DeepSpeed clips by total norm only, expected norm, got 'value'")
    if ds.offload_optimizer and stage == 0:
        raise ConfigError("trainer.deepspeed.offload_optimizer: needs trainer.deepspeed.zero_stage 1, 2 or 3, got 0")
    if ds.offload_params and stage != 3:
        raise ConfigError(f"trainer.deepspeed.offload_params: needs trainer.deepspeed.zero_stage 3, got {stage}")
    zero: dict[str, Any] = {"stage": stage}
    sources = {"zero_optimization.stage": "trainer.deepspeed.zero_stage"}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
        sources["zero_optimization.offload_optimizer.device"] = "trainer.deepspeed.offload_optimizer"
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu"}
        sources["zero_optimization.offload_param.device"] = "trainer.deepspeed.offload_params"
    cfg: dict[str, Any] = {
        "gradient_clipping": float(t.grad_clip or 0.0),
        "bf16": {"enabled": t.precision == "bf16-mixed"},
        # loss_scale 0 = dynamic loss scaling: overflowing steps are skipped and the scale lowered, as GradScaler does
        "fp16": {"enabled": t.precision == "fp16-mixed", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": zero,
        "managed_gradient_accumulation": False,
        # our optimizers are plain torch ones (Adam/AdamW/SGD); ZeRO partitions their state like any other
        "zero_allow_untested_optimizer": True,
        # and with offload they step on the CPU copies as they are (DeepSpeedCPUAdam would be a faster, JIT-built op)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": _QUIET,
        "wall_clock_breakdown": False,
    }
    sources |= {"gradient_clipping": "trainer.grad_clip", "bf16.enabled": "trainer.precision",
                "fp16.enabled": "trainer.precision"}
    if micro_batch is not None:
        world = world or 1
        cfg |= {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": t.grad_accum,
                "train_batch_size": micro_batch * t.grad_accum * world}
        sources |= {"train_micro_batch_size_per_gpu": "data.batch_size", "gradient_accumulation_steps":
                    "trainer.grad_accum", "train_batch_size": "data.batch_size x workers x trainer.grad_accum"}
    return cfg, sources


def _merge(ours: dict[str, Any], raw: dict[str, Any], sources: dict[str, str], where: str,
           prefix: str = "") -> dict[str, Any]:
    """raw on top of ours; a raw leaf that contradicts a value translated from a dtrain field is a ConfigError."""
    out = copy.deepcopy(ours)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        mine = out.get(key)
        if isinstance(mine, dict) and isinstance(value, dict):
            out[key] = _merge(mine, value, sources, where, dotted + ".")
            continue
        if isinstance(mine, dict) or any(s.startswith(dotted + ".") for s in sources):
            owned = [s for s in sources if s.startswith(dotted + ".")]
            if owned:
                raise ConfigError(f"{where}.{dotted}: expected a mapping, got {value!r} "
                                  f"(it would replace {', '.join(owned)})")
        if dotted in sources and key in out and value != out[key]:
            raise ConfigError(f"{where}.{dotted}: {value!r} conflicts with {out[key]!r} set by {sources[dotted]}; "
                              f"set it in one place")
        out[key] = copy.deepcopy(value)
    return out


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

    def __init__(self, trainer_cfg: Any, optim_cfg: Any, device: torch.device) -> None:
        self.trainer_cfg, self.optim_cfg, self.device = trainer_cfg, optim_cfg, device
        self.dtype = LOW_PRECISION.get(trainer_cfg.precision)
        self.micro_batch_size: int | None = None
        """Per-rank micro-batch size; the loop sets it before setup (DeepSpeed's config needs it)."""
        self.engine: Any = None
        self.template: nn.Module | None = None

    def setup(self, model: nn.Module, lr: float, total_steps: int, steps_per_epoch: int) -> nn.Module:
        import deepspeed  # imported here: it is slow to import and only needed under this strategy
        from deepspeed.accelerator import get_accelerator

        if self.engine is None and self.trainer_cfg.deepspeed.zero_stage == 3 and len(model.stages()) > 1:
            # set_stage (run by the loop before setup) rearranges weights, which ZeRO-3 keeps partitioned away
            raise ConfigError("trainer.deepspeed.zero_stage: a staged model (layer-wise pre-training) runs under "
                              "ZeRO 0-2, got 3")
        if self.engine is not None:  # a later stage of a staged model: start from the full fp32 weights again
            model = self._release(model)
        if self.dtype == torch.float16 and not get_accelerator().is_fp16_supported():
            raise ConfigError(f"trainer.precision: fp16-mixed is not supported by DeepSpeed on "
                              f"{get_accelerator().device_name()}; use bf16-mixed or 32")
        config = deepspeed_config(self.trainer_cfg, self.micro_batch_size or 1, dist.world_size())
        _quiet_deepspeed()
        _skip_inference_comm_op()
        # Ray Train and torchrun set LOCAL_RANK, which DeepSpeed insists on; a local spawn is a single node.
        os.environ.setdefault("LOCAL_RANK", str(dist.rank()))
        model = model.to(self.device)
        if self.dtype is not None or self.trainer_cfg.deepspeed.zero_stage == 3:
            self.template = copy.deepcopy(model)  # a plain fp32 copy to hand out full weights in (see unwrapped)
        # Fused, as under DDP: ZeRO steps it on this rank's fp32 partition like any torch optimizer (on the benchmark
        # MLP's 1.1M parameters one CPU Adam step is 0.6 ms fused, 5.1 ms as torch's default per-tensor loop).
        optimizer = build_optimizer(trainable(model), self.optim_cfg, lr, fused=True)
        plain_fp32 = self.dtype is None and config["zero_optimization"]["stage"] == 0
        if plain_fp32 and not config["gradient_clipping"]:
            config["gradient_clipping"] = float("inf")  # so DeepSpeed takes its clipping path, where we measure
        try:
            self.engine, *_ = deepspeed.initialize(
                model=model, optimizer=optimizer, config=config, dist_init_required=False,
                lr_scheduler=lambda opt: build_scheduler(opt, self.optim_cfg, total_steps, steps_per_epoch))
        except AssertionError as err:  # the engine's own sanity checks, which the load-time parse cannot run
            if not self.trainer_cfg.deepspeed.config:
                raise  # dtrain's translated config alone: not the user's mistake
            raise ConfigError(f"trainer.deepspeed.config: DeepSpeed rejects it: {_first_line(err)}") from None
        if plain_fp32:
            _measure_norm_when_clipping(self.engine, trainable(self.engine.module))
        if os.environ.get(MEMORY_ENV):
            self._measure_memory(Path(os.environ[MEMORY_ENV]))
        self.wrapped = _CastInputs(self.engine, self.dtype)
        return self.wrapped

    def autocast(self) -> ContextManager:
        # DeepSpeed keeps the weights themselves in bf16/fp16; autocast also lets tensors a model creates itself
        # (float32 by default, e.g. initial hidden states) meet those weights in matmuls and convolutions.
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def no_sync(self, enabled: bool) -> ContextManager:
        # With managed_gradient_accumulation=false DeepSpeed reduces at step() (ZeRO 0/1) or reduce-scatters in
        # every backward (ZeRO 2/3, which cannot defer it): nothing to switch off here.
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        # The loop already divided by the accumulation window: DeepSpeed must sum micro-batch gradients as they are.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self, loss: Tensor) -> StepResult:
        self.engine.step()  # DeepSpeed reads its overflow flag back to the host itself
        norm = self.engine.get_global_grad_norm()
        norm = torch.as_tensor(float("nan") if norm is None else float(norm), device=self.device)
        if self.dtype == torch.float16 or self.engine.was_step_applied():
            # An fp16 overflow is the loss scaler's business, as under DDP. Where DeepSpeed has no overflow check
            # (fp32, ZeRO-0) it applied the step regardless: a non-finite loss still counts towards stopping.
            return StepResult(norm, nonfinite(loss))
        return StepResult(norm, torch.ones((), device=self.device))

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, path: Path) -> None:
        # Every rank writes its own shard files into its own folder; merged (by Ray or LocalReporter) they form one
        # DeepSpeed checkpoint directory that engine.load_checkpoint and zero_to_fp32 both read.
        self.engine.save_checkpoint(str(path / CHECKPOINT_DIR), tag=TAG)

    def load(self, path: Path) -> None:
        folder = path / CHECKPOINT_DIR
        if not folder.is_dir():
            raise ConfigError(f"{path}: not a DeepSpeed checkpoint (no {CHECKPOINT_DIR}/ folder); resume it with "
                              "the strategy that wrote it")
        loaded, _ = self.engine.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise ConfigError(f"{folder}: DeepSpeed could not load the checkpoint")

    def unwrapped(self) -> nn.Module:
        module = self.engine.module
        if self.dtype is None and self.trainer_cfg.deepspeed.zero_stage < 3:
            return module  # the live module already holds the full float32 weights
        full = self._full_state()
        self.template.load_state_dict(full)
        return self.template

    def _measure_memory(self, folder: Path) -> None:
        """Write rank<r>.json into folder at the first optimizer step: the bytes this rank holds of what ZeRO
        partitions (optimizer state from stage 1, gradients from stage 2, weights at stage 3)."""
        import json

        engine, sizes = self.engine, {}

        def before(optimizer: Any, args: Any, kwargs: Any) -> None:
            # Inside DeepSpeed's step, after it reduced (and partitioned) the gradients: all of them are held now.
            params = list(engine.module.parameters()) + [p for g in optimizer.param_groups for p in g["params"]]
            sizes["grad_bytes"] = _state_bytes([p.grad for p in params])

        def after(optimizer: Any, args: Any, kwargs: Any) -> None:
            module = list(engine.module.parameters())
            sizes["optimizer_state_bytes"] = _state_bytes(list(optimizer.state.values()))  # exists after a step
            sizes["param_bytes"] = sum(_local(p).numel() * _local(p).element_size() for p in module)
            sizes["num_params"] = sum(getattr(p, "ds_numel", p.numel()) for p in module)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"rank{dist.rank()}.json").write_text(json.dumps(sizes))
            for handle in handles:  # once: by the end of the first step everything is allocated
                handle.remove()

        handles = [engine.basic_optimizer.register_step_pre_hook(before),
                   engine.basic_optimizer.register_step_post_hook(after)]

    def _full_state(self) -> dict[str, Tensor]:
        """Full float32 weights and buffers on every rank (a collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        module, out = self.engine.module, {}
        for name, p in module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:
                with _gathered(p):
                    full = p.detach().clone()
            out[name] = full.float().cpu()
        for mod_name, mod in module.named_modules():
            for name, b in mod._buffers.items():
                if b is not None and name not in mod._non_persistent_buffers_set:  # as state_dict keeps them
                    out[f"{mod_name}.{name}" if mod_name else name] = b.detach().clone().cpu()
        return out

    def _release(self, model: nn.Module) -> nn.Module:
        """Hand a model back from the old engine as plain float32 parameters (keeping each one's requires_grad)."""
        full = self._full_state()
        self.engine.destroy()
        self.engine = None
        for mod_name, mod in model.named_modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    key = f"{mod_name}.{name}" if mod_name else name
                    mod._parameters[name] = nn.Parameter(full[key].to(self.device), requires_grad=p.requires_grad)
        return model


def _quiet_deepspeed() -> None:
    """DeepSpeed logs its whole config and every phase of initialize at INFO; the loop reports what matters."""
    import logging
    import warnings

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    # DeepSpeed still calls the deprecated collective in ZeRO-3; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*deprecated", category=FutureWarning)


def _skip_inference_comm_op() -> None:
    """Keep DeepSpeed's communication backend from compiling its shared-memory all-reduce on CPU.

    On the CPU accelerator, DeepSpeed's backend JIT-compiles that C++ op when it starts, 40-60 s the first time on a
    machine (then cached in ~/.cache/torch_extensions). Only `inference_all_reduce` (tensor-parallel inference)
    uses it; training's collectives go through torch.distributed (gloo) either way. DeepSpeed builds the op only
    when its probe marks it compatible, and keeps the probe's result in one dict, so marking it not compatible
    skips the build. Accelerators without the op have no builder for it: nothing to do.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _measure_norm_when_clipping(engine: Any, params: list[nn.Parameter]) -> None:
    """DeepSpeed computes no gradient norm for fp32 ZeRO-0 (the torch optimizer steps as is): its clipping hook,
    which runs on the all-reduced gradients, measures the total norm here and clips with it.

    DeepSpeed's own clip_grad_norm_ would do the same with a norm kernel per tensor and an all-reduce of the norm
    across ranks (an average of equal values: every rank holds the same reduced gradients; it exists for
    mixture-of-experts layers, which the catalog has none of), one more blocking collective every step.
    """
    same = same_device_and_dtype(params)

    def clip_and_measure() -> None:
        norm = total_norm([p.grad for p in params if p.grad is not None], engine.device, same)
        if math.isfinite(engine.gradient_clipping()):
            torch.nn.utils.clip_grads_with_norm_(params, engine.gradient_clipping(), norm)
        engine._global_grad_norm = norm

    engine.clip_fp32_gradients = clip_and_measure


def _local(p: nn.Parameter) -> Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p  # ZeRO-3 keeps only this rank's partition


def _gathered(p: nn.Parameter) -> ContextManager:
    if hasattr(p, "ds_id"):  # a ZeRO-3 partitioned parameter: gather it on every rank
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=None)
    return contextlib.nullcontext()


def _state_bytes(obj: Any, seen: set[int] | None = None) -> int:
    """Bytes of every distinct tensor reachable from an optimizer (its state, flat partitions and master copies)."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        # the tensor's own bytes, not its storage's: ZeRO's partitions are views into larger flat buffers
        key = (obj.data_ptr(), obj.numel()) if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_state_bytes(v, seen) for v in obj)
    return 0
