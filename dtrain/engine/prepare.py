"""What every strategy does to a model before wrapping it: activation checkpointing and torch.compile, from
trainer.activation_checkpointing and trainer.compile (parsed here, checked when the job loads)."""

from __future__ import annotations

import functools
import importlib.util
import shutil
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

from dtrain.errors import ConfigError, check

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_PREPARED = "_dtrain_prepared"  # set on a model once prepared: a staged model is set up once per stage


@dataclass
class CompileOptions:
    """trainer.compile as a mapping (true means all defaults)."""

    mode: str = "default"
    """default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs (torch.compile's modes)."""
    fullgraph: bool = False
    """Fail instead of falling back to eager Python at a graph break."""
    backend: str = "inductor"
    """A torch.compile backend (torch.compiler.list_backends())."""
    dynamic: bool | None = None
    """Compile for varying batch sizes up front (true), never (false), or once a size changes (null)."""


def compile_options(value: Any) -> CompileOptions | None:
    """trainer.compile (false, true or a mapping of CompileOptions' fields) as options, or None when off;
    ConfigError for anything else, an unknown mode or a backend this torch does not have."""
    if value is None or value is False:
        return None
    if value is True:
        options = CompileOptions()
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(CompileOptions.__dataclass_fields__))
        check(not unknown, "trainer.compile", "true, false or a mapping of mode, fullgraph, backend, dynamic",
              f"unknown key {unknown[0]}" if unknown else value)
        options = CompileOptions(**value)
    elif isinstance(value, CompileOptions):
        options = value
    else:
        raise ConfigError(f"trainer.compile: expected true, false or a mapping of mode, fullgraph, backend, dynamic, "
                          f"got {value!r}")
    check(options.mode in MODES, "trainer.compile.mode", "one of " + ", ".join(MODES), options.mode)
    check(isinstance(options.fullgraph, bool), "trainer.compile.fullgraph", "true or false", options.fullgraph)
    backends = torch.compiler.list_backends(exclude_tags=())
    check(options.backend in backends, "trainer.compile.backend", "one of " + ", ".join(backends), options.backend)
    needs = _BACKEND_PACKAGES.get(options.backend)
    if needs and importlib.util.find_spec(needs) is None:
        raise ConfigError(f"trainer.compile.backend: {options.backend} needs the {needs} package, which is not "
                          "installed")
    if options.backend == "inductor" and not torch.cuda.is_available() and not _cxx_compiler():
        raise ConfigError("trainer.compile: inductor compiles for the CPU with a C++ compiler, and none is on PATH "
                          "(install g++, or set trainer.compile.backend: aot_eager)")
    return options


_BACKEND_PACKAGES = {"openxla": "torch_xla", "openxla_eval": "torch_xla", "tvm": "tvm"}


def _cxx_compiler() -> str | None:
    return next((path for name in ("c++", "g++", "clang++") if (path := shutil.which(name))), None)


def checkpoint_layers(value: Any) -> bool | list[str]:
    """trainer.activation_checkpointing: false, true (every top-level layer) or a list of layer names."""
    if isinstance(value, bool):
        return value
    if isinstance(value, list | tuple) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConfigError(f"trainer.activation_checkpointing: expected true, false or a list of layer names (e.g. "
                      f"[net]), got {value!r}")


def prepare_model(model: nn.Module, compile: CompileOptions | None, checkpointing: bool | list[str],
                  per_block: bool = False) -> nn.Module:
    """Apply activation checkpointing, then torch.compile, to model in place (once; later calls do nothing).

    checkpointing: true recomputes each top-level layer of the model (its direct children that hold weights) in
    the backward instead of keeping its activations; a list names the layers (qualified module names).
    per_block: compile each of model.shard_blocks() separately (FSDP shards them one by one; the root stays eager),
    else the whole model.
    """
    if getattr(model, _PREPARED, False):
        return model
    if checkpointing:
        for layer in _layers(model, checkpointing):
            _recompute_in_backward(layer)
    if compile is not None:
        kwargs = {"mode": None if compile.mode == "default" else compile.mode, "fullgraph": compile.fullgraph,
                  "backend": compile.backend, "dynamic": compile.dynamic}
        blocks = model.shard_blocks() if per_block else []
        for module in blocks or [model]:
            module.compile(**kwargs)
    setattr(model, _PREPARED, True)
    return model


def _layers(model: nn.Module, checkpointing: bool | list[str]) -> list[nn.Module]:
    if checkpointing is True:
        return [child for child in model.children() if any(True for _ in child.parameters())]
    named = dict(model.named_modules())
    missing = [name for name in checkpointing if name not in named or name == ""]
    if missing:
        layers = ", ".join(name for name in named if name and "." not in name)
        raise ConfigError(f"trainer.activation_checkpointing: no layer {missing[0]!r} in model "
                          f"{type(model).__name__} (its top-level layers: {layers})")
    return [named[name] for name in checkpointing]


def _recompute_in_backward(module: nn.Module) -> None:
    """Run module's forward under torch.utils.checkpoint: only its inputs are kept; the backward runs it again."""
    forward = module.forward

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed
