"""PyTorch's private APIs used by dtrain's engine and tests, in one place (see dtrain.compat)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn


def foreach_norm(tensors: list[Tensor]) -> list[Tensor]:
    """One 2-norm per tensor, in one kernel per device/dtype group (torch._foreach_norm)."""
    return torch._foreach_norm(tensors)


def step_unless(optimizer: torch.optim.Optimizer, skipped: Tensor) -> None:
    """Step a fused optimizer unless skipped (a 0-dim device tensor) is 1, deciding on the device.

    Fused Adam/AdamW/SGD read ``found_inf`` (and ``grad_scale``) from the optimizer while stepping, as a GradScaler
    sets them: with them set the update is skipped in the kernel, so the host never waits to learn whether to step.
    """
    optimizer.grad_scale, optimizer.found_inf = None, skipped
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale, optimizer.found_inf


def set_last_lr(scheduler: torch.optim.lr_scheduler.LRScheduler, lrs: list[float]) -> None:
    """What scheduler.get_last_lr() returns (its _last_lr), after the groups' rates were changed from outside."""
    scheduler._last_lr = list(lrs)


def persistent_buffers(module: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """(qualified name, buffer) of every buffer that state_dict() keeps (non-persistent ones are left out)."""
    for mod_name, mod in module.named_modules():
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                yield (f"{mod_name}.{name}" if mod_name else name), buf


def dispatch_mode() -> type:
    """TorchDispatchMode: sees every aten op (the read-back guard counts device-to-host transfers with it)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    return TorchDispatchMode


def is_compiled(module: nn.Module) -> bool:
    """Whether module.compile() was applied to module (its __call__ then runs the compiled _call_impl)."""
    return module._compiled_call_impl is not None


def _steps_read_found_inf() -> bool:
    """Whether Adam's and SGD's step still take found_inf from the optimizer (what step_unless relies on)."""
    steps = (torch.optim.Adam.step, torch.optim.SGD.step)
    return all('getattr(self, "found_inf"' in inspect.getsource(step) for step in steps)


def default_store() -> Any:
    """The key-value store the default process group was set up with (its rendezvous, served by rank 0)."""
    import torch.distributed.distributed_c10d as c10d

    return c10d._get_default_store()


def check() -> None:
    """CompatError naming each private PyTorch API above that no longer exists."""
    from dtrain.compat import require

    require({
        "torch._foreach_norm": lambda: torch._foreach_norm,
        "Adam/SGD.step reading optimizer.found_inf": lambda: _steps_read_found_inf() or None,
        "LRScheduler._last_lr": lambda: "self._last_lr" in inspect.getsource(
            torch.optim.lr_scheduler.LRScheduler.get_last_lr) or None,
        "nn.Module._buffers": lambda: nn.Linear(1, 1)._buffers,
        "nn.Module._non_persistent_buffers_set": lambda: nn.Linear(1, 1)._non_persistent_buffers_set,
        "torch.utils._python_dispatch.TorchDispatchMode": dispatch_mode,
        "nn.Module._compiled_call_impl": lambda: hasattr(nn.Linear(1, 1), "_compiled_call_impl") or None,
        "torch.distributed.distributed_c10d._get_default_store": lambda: getattr(
            importlib.import_module("torch.distributed.distributed_c10d"), "_get_default_store", None),
    })


SPAWN_LOGGER = "torch.multiprocessing.spawn"
"""torch.multiprocessing's process launcher: it logs a warning line for each rank it stops after another failed."""


def quiet_rank_terminations() -> None:
    """No 'Terminating process ... via signal SIGTERM' line per stopped rank: the failed rank's error says it all."""
    import logging

    logging.getLogger(SPAWN_LOGGER).setLevel(logging.ERROR)
