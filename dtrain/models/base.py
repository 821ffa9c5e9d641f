"""The model interface every catalog model implements: ``forward(batch)`` is the training/eval step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class StepOutput:
    """What a model's forward returns: the loss backward runs on and batch-mean metrics to log."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Stage:
    """One phase of training (e.g. pre-training one RBM layer of a DBN); most models have a single stage."""

    name: str = "train"
    max_epochs: int | None = None
    """Epochs for this stage; None uses trainer.max_epochs."""
    lr: float | None = None
    """Learning rate for this stage; None uses optim.lr."""


@dataclass
class DataMeta:
    """What a model needs to know about its data to build itself."""

    input_shape: tuple[int, ...]
    """Shape of one sample (features), e.g. (64,), (1, 8, 8) or (seq_len, channels)."""
    num_classes: int = 0
    """Classes for classification, 0 otherwise."""
    output_dim: int = 0
    """Targets per sample for regression, 0 otherwise."""
    task: str = "classification"
    """classification, regression or unsupervised."""
    period: int | None = None
    """Known period of a series in samples, when there is one."""


class CatalogModel(nn.Module):
    """Base class: subclasses implement ``forward(batch) -> StepOutput``; the engine calls it through the
    DDP/DeepSpeed wrapper so gradient synchronisation always happens."""

    def stages(self) -> list[Stage]:
        """Training phases run in order by the engine; one by default."""
        return [Stage()]

    def set_stage(self, stage: Stage) -> None:
        """Prepare for a stage (freeze/unfreeze parameters, switch the loss)."""

    def predict(self, x: Tensor) -> Tensor:
        """Model output for inputs x (logits, forecasts, reconstructions or features)."""
        raise NotImplementedError

    def shard_blocks(self) -> list[nn.Module]:
        """The layers FSDP shards one at a time (and compile and activation checkpointing treat as units); the
        root holds the rest. Default: every Linear, convolution, recurrent and normalisation layer. A model that
        reads a layer's weights outside that layer's forward returns [] (see dtrain.models.parallel)."""
        from dtrain.models.parallel import default_blocks

        return default_blocks(self)

    def parallelize(self, **fsdp: Any) -> None:
        """Shard this model with FSDP2 (torch.distributed.fsdp.fully_shard, options as given): each block, then
        the root. Override beside a model to cut it differently."""
        from dtrain.models.parallel import parallelize

        parallelize(self, self.shard_blocks(), **fsdp)

    @staticmethod
    def all_reduce_sum(t: Tensor) -> Tensor:
        """Sum t over the data-parallel ranks, in place. The engine installs its collective on the model before
        training (a model never imports the engine); alone, in one process, this returns t as it is."""
        return t


def classification_step(logits: Tensor, y: Tensor) -> StepOutput:
    """Cross-entropy with accuracy, in float32 for a stable loss under mixed precision."""
    logits = logits.float()
    loss = F.cross_entropy(logits, y)
    acc = (logits.argmax(dim=-1) == y).float().mean()
    return StepOutput(loss, {"loss": loss.detach(), "acc": acc})


def regression_step(pred: Tensor, y: Tensor) -> StepOutput:
    """Mean squared error with mean absolute error."""
    pred = pred.float().reshape(y.shape)
    loss = F.mse_loss(pred, y)
    return StepOutput(loss, {"loss": loss.detach(), "mse": loss.detach(), "mae": (pred - y).abs().mean().detach()})


def supervised_step(model: CatalogModel, batch: tuple[Tensor, ...], task: str) -> StepOutput:
    """The step of every supervised model: predict, then the task's loss."""
    x, y = batch
    out = model.predict(x)
    return classification_step(out, y) if task == "classification" else regression_step(out, y)


def flat_dim(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
