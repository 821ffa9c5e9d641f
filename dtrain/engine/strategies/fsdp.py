"""PyTorch FSDP2 (torch.distributed.fsdp.fully_shard): every rank holds 1/N of the weights, gradients and optimizer
state as DTensors; each block's weights are gathered just before its forward and backward. The model cuts itself
into blocks (CatalogModel.shard_blocks / parallelize, beside each model); checkpoints are torch.distributed.checkpoint
shards, one set of files per rank, never gathered."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from dtrain.compat.torch import step_unless
from dtrain.engine import dist
from dtrain.engine.checkpoint import atomic_save, safe_load
from dtrain.engine.optim import build_optimizer, build_scheduler, constant_schedule, retarget, trainable
from dtrain.engine.prepare import prepare_model
from dtrain.engine.strategies.base import StepResult, StrategySetup
from dtrain.engine.strategies.grads import all_finite, clip, nonfinite
from dtrain.errors import ConfigError, check

CHECKPOINT_DIR = "fsdp"
"""Sub-folder of a dtrain checkpoint holding the torch.distributed.checkpoint shards (model and optimizer)."""
SCHEDULE_FILE = "fsdp_schedule.pt"
"""The LR schedule's and loss scaler's state (the same on every rank: rank 0 writes it)."""


@dataclass
class FSDPOptions:
    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward and gather them again for its backward (ZeRO-3-like,
    least memory); false keeps them until the backward (ZeRO-2-like, one all-gather less per block)."""
    offload_params: bool = False
    """Keep the sharded weights, gradients and optimizer state in CPU memory and step the optimizer there (a GPU
    run; the weights are copied to the GPU for each forward and backward)."""

    def __post_init__(self) -> None:
        check(isinstance(self.reshard_after_forward, bool), "trainer.fsdp.reshard_after_forward", "true or false",
              self.reshard_after_forward)


class FSDPStrategy:
    """fully_shard over all ranks; mixed precision by MixedPrecisionPolicy; clipping and the non-finite skip on the
    all-reduced norm of the sharded gradients, decided on the device, as under DDP."""

    Options: ClassVar[type | None] = FSDPOptions

    def __init__(self, setup: StrategySetup, options: FSDPOptions | None = None) -> None:
        self.cfg, self.device, self.precision = setup, setup.device, setup.precision
        self.options = options or FSDPOptions()
        self.model: nn.Module | None = None

    @classmethod
    def check(cls, options: FSDPOptions, *, precision: str, **trainer: Any) -> None:
        """fp16 needs a loss scaler that agrees across shards; offloading needs a GPU to offload from."""
        if precision == "fp16-mixed":
            raise ConfigError("trainer.precision: fsdp runs 32 or bf16-mixed, got 'fp16-mixed' (use bf16-mixed, or "
                              "fp16-mixed under ddp)")
        if options is not None and options.offload_params and not torch.cuda.is_available():
            raise ConfigError("trainer.fsdp.offload_params: offloads from a CUDA GPU to the CPU, and there is no GPU "
                              "here; set it to false")

    def setup(self, model: nn.Module, lr: float, total_steps: int, steps_per_epoch: int) -> nn.Module:
        if self.model is None:  # sharded once: a staged model's later stages only change what is trainable
            if self.options.offload_params and self.device.type != "cuda":
                raise ConfigError("trainer.fsdp.offload_params: offloads from a CUDA GPU to the CPU; this worker "
                                  "has none")
            self.model = self._shard(model.to(self.device))
        self.params = trainable(self.model)
        # Fused, as under DDP: it steps the local shards and takes the skip decision as a device tensor. torch has
        # no sharded fused SGD kernel (aten._fused_sgd_ has no DTensor rule): SGD steps with foreach kernels and
        # reads the skip decision back, once per step.
        self.fused = self.cfg.optim.name != "sgd"
        self.optimizer = build_optimizer(self.params, self.cfg.optim, lr, fused=self.fused or None)
        self.scheduler = build_scheduler(self.optimizer, self.cfg.optim, total_steps, steps_per_epoch)
        self.constant_lr = constant_schedule(self.cfg.optim)
        return self.model

    def _shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        prepare_model(model, self.cfg.compile, self.cfg.activation_checkpointing, per_block=True)
        # Weights are gathered in the compute dtype, gradients reduced in float32 (bf16 sums lose too much). The
        # inputs are left alone: targets stay float32; autocast (below) casts what meets the weights.
        mixed = MixedPrecisionPolicy(param_dtype=self.precision.dtype, reduce_dtype=torch.float32,
                                     cast_forward_inputs=False)
        offload = CPUOffloadPolicy() if self.options.offload_params else OffloadPolicy()
        mesh = init_device_mesh(self.device.type, (dist.world_size(),))
        model.parallelize(mesh=mesh, mp_policy=mixed, offload_policy=offload,
                          reshard_after_forward=self.options.reshard_after_forward)
        return model

    def autocast(self) -> ContextManager:
        # Tensors a model creates itself (float32 by default, e.g. initial hidden states) meet bf16 weights
        return self.precision.autocast()

    def no_sync(self, enabled: bool) -> ContextManager:
        # FSDP reads the flag in the backward, which the loop runs after this context: set it for this micro-batch
        self.model.set_requires_gradient_sync(not enabled)
        return contextlib.nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self, loss: Tensor) -> StepResult:
        grads = [p.grad for p in self.params if p.grad is not None]
        # The norm of sharded gradients: each rank's partial sums, all-reduced (a collective, no host read-back).
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        norm = _full(norm)
        clip(self.params, self.cfg.grad_clip, self.cfg.grad_clip_mode, norm)
        skipped = nonfinite(norm)  # the same on every rank, decided on the device
        if self.fused:
            step_unless(self.optimizer, skipped)
        elif not bool(skipped):
            self.optimizer.step()
        if not self.constant_lr:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(norm, skipped)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def retarget(self, lr: float) -> None:
        retarget(self.optimizer, self.scheduler, self.cfg.optim, lr)

    def weights_finite(self) -> bool:
        """Each rank checks its shards; one all-reduce agrees."""
        held = [_local(p) for p in self.model.parameters()]
        bad = 1.0 - all_finite(held, self.device)
        return float(dist.all_reduce_sum(bad)) == 0.0

    def snapshot(self, folder: Path) -> Callable[[], None]:
        """Each rank writes its shards into its own folder (rank 0 also DCP's .metadata); merged by the launcher
        they form one torch.distributed.checkpoint directory, readable at any world size.

        Written now, on the training thread: dcp.save agrees on the layout with collectives, which must not run
        beside training's own on the same process group."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(), storage_writer=dcp.FileSystemWriter(folder / CHECKPOINT_DIR))
        if dist.rank() == 0:
            atomic_save({"scheduler": self.scheduler.state_dict(), "scaler": self.precision.scaler.state_dict()},
                        folder / SCHEDULE_FILE)
        return lambda: None

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        if not (folder / CHECKPOINT_DIR / ".metadata").is_file():
            raise ConfigError(f"{folder}: not an FSDP checkpoint (no {CHECKPOINT_DIR}/.metadata); resume it with the "
                              "strategy that wrote it")
        state = self._state()
        dcp.load(state, storage_reader=dcp.FileSystemReader(folder / CHECKPOINT_DIR))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        extra = safe_load(folder / SCHEDULE_FILE)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.precision.scaler.load_state_dict(extra["scaler"])

    def full_state_dict(self) -> dict[str, Tensor]:
        """The full float32 weights and buffers on every rank's CPU (an all-gather per sharded tensor)."""
        return {k: _full(v).detach().float().cpu() if v.is_floating_point() else _full(v).detach().cpu()
                for k, v in self.model.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, Tensor]) -> bool:
        """Each rank takes its shards of the full weights."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # a copy: it replaces the dict's tensors with this rank's shards
        set_model_state_dict(self.model, dict(state), options=StateDictOptions(full_state_dict=True))
        return True

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optimizer}


def _full(t: Tensor) -> Tensor:
    """A DTensor gathered (or reduced) into a plain tensor; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
