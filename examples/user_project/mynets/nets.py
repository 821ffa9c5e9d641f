"""Plain PyTorch modules, unchanged: dtrain trains them through `model: {name: module, target: ...}`."""

from __future__ import annotations

import math

from torch import Tensor, nn


class SmallNet(nn.Module):
    """A two-layer perceptron. input_shape and num_classes are filled in by dtrain from the data."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                                 nn.Dropout(dropout), nn.Linear(width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

