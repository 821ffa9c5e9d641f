"""DeepSpeed's private APIs used by dtrain's DeepSpeed strategy and its probes, in one place (see dtrain.compat).

Nothing here imports deepspeed at module import time: the strategy imports this module when it is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor, nn

SHARED_MEMORY_COMM_OP = "ShareMemCommBuilder"


def skip_shared_memory_comm_op() -> None:
    """Keep DeepSpeed's communication backend from JIT-compiling its shared-memory all-reduce on CPU.

    On the CPU accelerator DeepSpeed's backend compiles that C++ op when it starts, the first time on a machine
    (BENCHMARKS.md, Start-up). Only `inference_all_reduce` (tensor-parallel inference) uses it; training's
    collectives go through torch.distributed (gloo) either way. DeepSpeed builds the op only when its probe marks it
    compatible, and keeps the probe's result in one dict (``deepspeed.ops.__compatible_ops__``), so marking it not
    compatible skips the build. Accelerators without the op have no builder for it: nothing to do.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(SHARED_MEMORY_COMM_OP)
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def replace_fp32_clipping(engine: Any, clip: Callable[[], Tensor]) -> None:
    """Run clip() where DeepSpeed clips fp32 ZeRO-0 gradients (engine.clip_fp32_gradients, called after the
    all-reduce), and make the norm it returns the engine's global gradient norm (engine._global_grad_norm)."""

    def clip_and_record() -> None:
        engine._global_grad_norm = clip()

    engine.clip_fp32_gradients = clip_and_record


def torch_optimizer(engine: Any) -> Any:
    """The torch optimizer DeepSpeed steps on this rank's fp32 partition (engine.basic_optimizer)."""
    return engine.basic_optimizer


def local_tensor(p: nn.Parameter) -> Tensor:
    """The part of p this rank holds: its ZeRO-3 partition (p.ds_tensor), else p itself."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p


def full_numel(p: nn.Parameter) -> int:
    """Elements of the whole parameter, also when ZeRO-3 partitioned it (p.ds_numel)."""
    return getattr(p, "ds_numel", p.numel())


def is_partitioned(p: nn.Parameter) -> bool:
    """Whether ZeRO-3 partitioned p (it then carries a ds_id)."""
    return hasattr(p, "ds_id")


def config_parser() -> type:
    """DeepSpeed's own config class (deepspeed.runtime.config.DeepSpeedConfig), which validates a config dict."""
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig


# DeepSpeed's module-level caches of process groups (deepspeed.utils.groups), filled on its first initialize.
_GROUP_CACHES = ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                 "_TENSOR_MODEL_PARALLEL_GROUP")


def forget_process_groups() -> None:
    """Drop the process groups DeepSpeed cached, so that an engine built after the default group was destroyed and
    created again in the same process uses the new one (else: "Group ... is not registered")."""
    import sys

    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name in _GROUP_CACHES:
            setattr(groups, name, None)


def to_universal(src: Path, dest: Path) -> None:
    """DeepSpeed's universal checkpoint: convert one tag's ZeRO checkpoint folder src (shards written at one world
    size) into dest, which loads at any world size. This is DeepSpeed's `ds_to_universal` script, called through its
    main() with the arguments its command line would parse; `inject_missing_state` adds the per-model information
    that Megatron-style models save themselves and plain modules do not."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(src), output_folder=str(dest), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints each file it writes
        ds_to_universal.main(args)


def load_universal(engine: Any, enabled: bool) -> None:
    """Make engine.load_checkpoint read a universal checkpoint (the `checkpoint.load_universal` config key, which
    the engine reads into its config when it is built; dtrain learns only at resume which kind it loads)."""
    engine._config.load_universal_checkpoint = enabled


def check() -> None:
    """CompatError naming each private DeepSpeed API above that no longer exists."""
    import importlib
    import inspect

    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    from dtrain.compat import require

    def clip_hook() -> Any:  # the engine must still call its clip_fp32_gradients method when clipping fp32 ZeRO-0
        return "self.clip_fp32_gradients()" in inspect.getsource(DeepSpeedEngine._take_model_step) or None

    require({
        "deepspeed.ops.__compatible_ops__": lambda: deepspeed.ops.__compatible_ops__,
        f"accelerator op builder {SHARED_MEMORY_COMM_OP}": lambda: get_accelerator().create_op_builder(
            SHARED_MEMORY_COMM_OP) or get_accelerator().device_name() != "cpu" or None,
        "DeepSpeedEngine.clip_fp32_gradients": lambda: DeepSpeedEngine.clip_fp32_gradients,
        "DeepSpeedEngine._take_model_step calling clip_fp32_gradients": clip_hook,
        "DeepSpeedEngine.get_global_grad_norm returning _global_grad_norm": lambda: (
            "self._global_grad_norm" in inspect.getsource(DeepSpeedEngine.get_global_grad_norm) or None),
        "DeepSpeedEngine.basic_optimizer": lambda: "self.basic_optimizer" in inspect.getsource(DeepSpeedEngine) or None,
        "ZeRO-3 parameter attributes ds_tensor/ds_numel/ds_id": lambda: all(
            f"param.{a}" in inspect.getsource(Init) for a in ("ds_tensor", "ds_numel", "ds_id")) or None,
        "deepspeed.runtime.config.DeepSpeedConfig": config_parser,
        "deepspeed.checkpoint.ds_to_universal.main(args) reading the arguments to_universal passes": lambda: all(
            f"args.{a}" in inspect.getsource(importlib.import_module("deepspeed.checkpoint.ds_to_universal"))
            for a in ("input_folder", "output_folder", "num_extract_workers", "num_merge_workers",
                      "keep_temp_folder", "strict", "inject_missing_state")) or None,
        "DeepSpeedEngine._config.load_universal_checkpoint": lambda: (
            "self._config.load_universal_checkpoint" in inspect.getsource(DeepSpeedEngine) or None),
        "deepspeed.utils.groups process-group caches": lambda: all(
            hasattr(importlib.import_module("deepspeed.utils.groups"), n) for n in _GROUP_CACHES) or None,
    })
