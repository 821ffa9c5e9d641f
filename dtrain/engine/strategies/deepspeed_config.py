"""DeepSpeed's job section (trainer.deepspeed) and its translation into a DeepSpeed config dict.

Plain Python (neither torch nor deepspeed is imported here), so the job schema can check a DeepSpeed job when it is
loaded, and the DeepSpeed strategy builds its config from the same function in each worker.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from dtrain.errors import ConfigError, check, first_line

_QUIET = 2**31 - 1  # steps_per_print: the loop reports progress, DeepSpeed's own prints would be noise


@dataclass
class DeepSpeedOptions:
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU (ZeRO 3)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys, merged on top of the translated config."""

    def __post_init__(self) -> None:
        check(self.zero_stage in (0, 1, 2, 3), "trainer.deepspeed.zero_stage", "0, 1, 2 or 3", self.zero_stage)


# Keys the loop must own: it calls step() at the end of each accumulation window it chose (also a shorter last
# window of an epoch), so DeepSpeed must not count micro-batches itself, and the optimizer/schedule come from optim.*.
_OWNED = {"managed_gradient_accumulation": "the training loop (it owns accumulation windows)",
          "optimizer": "optim.* (name, lr, weight_decay, momentum)",
          "scheduler": "optim.scheduler and optim.warmup_steps"}


def deepspeed_config(options: DeepSpeedOptions, *, precision: str, grad_clip: float | None, grad_clip_mode: str,
                     grad_accum: int, micro_batch: int | None = None, world: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for these settings, with trainer.deepspeed.config merged on top; ConfigError on a
    conflict.

    Without micro_batch/world (config-load time) the batch-size keys are left out and the rest is checked, by
    DeepSpeed's own parser too when there are raw keys.
    """
    ours, sources = _translate(options, precision, grad_clip, grad_clip_mode, grad_accum, micro_batch, world)
    raw = dict(options.config or {})
    for key, owner in _OWNED.items():
        if key in raw:
            raise ConfigError(f"trainer.deepspeed.config.{key}: not allowed, it is set by {owner}")
    if micro_batch is None:  # batch keys are checked once the batch size is known (in each worker)
        raw = {k: v for k, v in raw.items() if k not in _BATCH_KEYS}
    merged = _merge(ours, raw, sources, "trainer.deepspeed.config")
    if micro_batch is None and raw:
        one_rank = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": grad_accum,
                    "train_batch_size": grad_accum}
        _check_with_deepspeed({**merged, **one_rank}, raw)
    return merged


def _check_with_deepspeed(config: dict[str, Any], raw: dict[str, Any]) -> None:
    """DeepSpeed's own parser on a config with raw keys, at load time: a misspelt or mistyped key (its sections are
    pydantic models that forbid unknown keys) or a combination it refuses is one ConfigError line before anything
    starts, not a traceback from every worker. Imports DeepSpeed's config module, only for raw keys."""
    import logging

    from dtrain.compat.deepspeed import config_parser

    logging.disable(logging.WARNING)  # importing DeepSpeed logs its accelerator choice: noise in a config check
    try:
        from pydantic import ValidationError

        config_parser()(config)
    except ValidationError as err:  # the first bad field of one of DeepSpeed's sections
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        path = (_find_key(raw, loc[0], first["input"]) or loc[:1]) + loc[1:]
        raise ConfigError(f"trainer.deepspeed.config.{'.'.join(path)}: DeepSpeed rejects it: {first['msg']}") from None
    except (ValueError, AssertionError, TypeError) as err:  # TypeError: sections parsed by hand, e.g. flops_profiler
        raise ConfigError(f"trainer.deepspeed.config: DeepSpeed rejects it: {first_line(err)}") from None
    finally:
        logging.disable(logging.NOTSET)


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


def _translate(ds: DeepSpeedOptions, precision: str, grad_clip: float | None, grad_clip_mode: str, grad_accum: int,
               micro_batch: int | None, world: int | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Our trainer settings in DeepSpeed's terms, and for each translated leaf the dtrain field it came from."""
    stage = ds.zero_stage
    if grad_clip is not None and grad_clip_mode != "norm":
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
        "gradient_clipping": float(grad_clip or 0.0),
        "bf16": {"enabled": precision == "bf16-mixed"},
        # loss_scale 0 = dynamic loss scaling: overflowing steps are skipped and the scale lowered, as GradScaler does
        "fp16": {"enabled": precision == "fp16-mixed", "loss_scale": 0, "initial_scale_power": 16},
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
        cfg |= {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
                "train_batch_size": micro_batch * grad_accum * world}
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
