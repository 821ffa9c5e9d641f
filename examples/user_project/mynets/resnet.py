"""A small residual CNN written against dtrain's model contract: forward(batch) -> StepOutput."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from dtrain.errors import check
from dtrain.models import CatalogModel, DataMeta, StepOutput


class Block(nn.Module):
    """conv -> norm -> relu -> conv -> norm, plus the input (the residual connection)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(4, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(4, channels)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(x + self.norm2(self.conv2(out)))


class TinyResNet(CatalogModel):
    """A residual CNN for small images shaped (channels, height, width)."""

    @dataclass
    class Config:
        """The model section's options (validated like a catalog model's: unknown keys and wrong types fail)."""

        channels: int = 16
        """Width of the stem and of every residual block (a multiple of 4: GroupNorm uses 4 groups)."""
        blocks: int = 2
        """Residual blocks after the stem."""

        def __post_init__(self) -> None:
            # dtrain's one-line error shape: "<key>: expected <what>, got <value>"
            check(self.channels >= 4 and self.channels % 4 == 0, "model.channels", "a multiple of 4", self.channels)

    def __init__(self, cfg: Config, meta: DataMeta) -> None:
        super().__init__()
        in_channels = meta.input_shape[0]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, cfg.channels, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[Block(cfg.channels) for _ in range(cfg.blocks)])
        self.head = nn.Linear(cfg.channels * math.prod(meta.input_shape[1:]), meta.num_classes)

    def predict(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).flatten(1))

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        x, y = batch
        logits = self.predict(x).float()  # the loss in float32, also under mixed precision
        loss = F.cross_entropy(logits, y)
        return StepOutput(loss, {"loss": loss.detach(), "acc": (logits.argmax(-1) == y).float().mean()})
