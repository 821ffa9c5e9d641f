"""Callbacks: code run inside every training process at three points of the loop, installed by whoever launches the
run (trainer.callbacks in a job, or the `callbacks` argument of the launchers), never by branches in the loop.

Tests use them to kill a rank at a chosen step; benchmarks to measure what each rank holds. A callback must be
picklable: it travels to the workers with the job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from dtrain.engine.state import TrainState


class Callback:
    """Override what you need; the loop calls every installed callback at these points, in order."""

    def on_setup(self, strategy: Any, model: nn.Module, rank: int) -> None:
        """After the strategy set up the model and optimizer (once per stage of a staged model)."""

    def on_step_end(self, state: TrainState, rank: int) -> None:
        """After each optimizer step (state.step is the step just done)."""

    def on_epoch_end(self, state: TrainState, rank: int) -> None:
        """When the training thread is done with an epoch's end: validation, logging, and its checkpoint started
        (written in the background unless checkpoint.background is off)."""

    def log_values(self) -> dict[str, float]:
        """Host values this rank adds to a logged step, gathered per rank to rank 0 in the loop's own collective
        ('<key>/rank<r>'). Every rank must return the same keys."""
        return {}


class StateBytes(Callback):
    """Writes rank<r>.json into folder at the first optimizer step: the bytes this rank holds of the weights, the
    gradients and the optimizer state, which sharding strategies (ZeRO, FSDP) divide among ranks.

    Gradients are measured inside the optimizer's step, once they are reduced (and partitioned) and before they
    are released; the state after the step, when it exists.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def on_setup(self, strategy: Any, model: nn.Module, rank: int) -> None:
        from dtrain.compat.deepspeed import full_numel, local_tensor

        optimizer, sizes, handles = strategy.optimizer, {}, []
        module = getattr(strategy, "engine", None)
        params = list((module.module if module is not None else model).parameters())

        def before(opt: Any, args: Any, kwargs: Any) -> None:
            grads = params + [p for g in opt.param_groups for p in g["params"]]
            sizes["grad_bytes"] = tensor_bytes([p.grad for p in grads])

        def after(opt: Any, args: Any, kwargs: Any) -> None:
            sizes["optimizer_state_bytes"] = tensor_bytes(list(opt.state.values()))
            sizes["param_bytes"] = sum(tensor_bytes(_held(local_tensor(p))) for p in params)
            sizes["num_params"] = sum(full_numel(p) for p in params)
            self.folder.mkdir(parents=True, exist_ok=True)
            (self.folder / f"rank{rank}.json").write_text(json.dumps(sizes))
            for handle in handles:  # once: by the end of the first step everything is allocated
                handle.remove()

        handles += [optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)]


def _held(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def tensor_bytes(obj: Any, seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from obj (dicts, lists, tuples), DTensors by their local shard."""
    seen = set() if seen is None else seen
    if isinstance(obj, Tensor):
        obj = _held(obj)
        # the tensor's own bytes, not its storage's: ZeRO's partitions are views into larger flat buffers
        key = (obj.data_ptr(), obj.numel()) if obj.numel() else id(obj)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0
