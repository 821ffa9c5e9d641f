"""Convolutional network: conv -> activation -> pooling blocks, then fully connected layers."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from dtrain.errors import ConfigError
from dtrain.models.base import CatalogModel, DataMeta, StepOutput, supervised_step
from dtrain.models.layers import LayerConfig, activation_of, check_widths, init_module


@dataclass
class CNNConfig(LayerConfig):
    name: str = "cnn"
    channels: list[int] = field(default_factory=lambda: [16, 32])
    """Output channels of each conv block (conv -> activation -> pool)."""
    kernel_size: int = 3
    """Square kernel of every convolution; padding keeps the spatial size."""
    pool: str = "max"
    """Pooling after each conv block: max, avg or none."""
    pool_size: int = 2
    """Pooling window and stride (skipped once the feature map is smaller than the window)."""
    hidden: list[int] = field(default_factory=lambda: [64])
    """Widths of the fully connected layers after the conv blocks."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool not in ("max", "avg", "none"):
            raise ConfigError(f"model.pool: expected max, avg or none, got {self.pool!r}")
        if self.kernel_size < 1 or self.pool_size < 1:
            raise ConfigError(f"model.kernel_size/pool_size: expected integers >= 1, got {self.kernel_size} "
                              f"and {self.pool_size}")
        if not self.channels or min(self.channels) < 1:
            raise ConfigError(f"model.channels: expected a non-empty list of integers >= 1, got {self.channels!r}")
        check_widths(self.hidden)


class CNN(CatalogModel):
    """A small 2-d convolutional classifier/regressor for images shaped (channels, height, width)."""

    def __init__(self, cfg: CNNConfig, meta: DataMeta) -> None:
        super().__init__()
        self.task = meta.task
        shape = tuple(meta.input_shape)
        if len(shape) == 2:  # (H, W): a single channel
            shape = (1, *shape)
        if len(shape) != 3:
            raise ConfigError(f"model.name=cnn: expected images shaped (channels, height, width), got samples of "
                              f"shape {tuple(meta.input_shape)} (for digits set data.options.image=true)")
        self.image_shape = shape
        channels, height, width = shape
        layers: list[nn.Module] = []
        for out in cfg.channels:
            layers += [nn.Conv2d(channels, out, cfg.kernel_size, padding=cfg.kernel_size // 2), activation_of(cfg)]
            grow = 1 - cfg.kernel_size % 2  # padding k // 2 keeps odd kernels' size, grows even ones' by one
            height, width = height + grow, width + grow
            if cfg.pool != "none" and min(height, width) >= cfg.pool_size:
                pool = nn.MaxPool2d if cfg.pool == "max" else nn.AvgPool2d
                layers.append(pool(cfg.pool_size))
                height, width = height // cfg.pool_size, width // cfg.pool_size
            channels = out
        layers.append(nn.Flatten())
        features = channels * height * width
        for h in cfg.hidden:
            layers += [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
            layers += [nn.Linear(features, h), activation_of(cfg)]
            features = h
        layers += [nn.Dropout(cfg.dropout)] if cfg.dropout > 0 else []
        layers.append(nn.Linear(features, meta.num_classes or meta.output_dim or 1))
        self.net = nn.Sequential(*layers)
        init_module(self, cfg.init, cfg.activation)

    def predict(self, x: Tensor) -> Tensor:
        return self.net(x.reshape(len(x), *self.image_shape))

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        return supervised_step(self, batch, self.task)
