"""Perceptron (a single linear layer) and the multi-layer perceptron."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from dtrain.errors import ConfigError
from dtrain.models.base import CatalogModel, DataMeta, StepOutput, flat_dim, supervised_step
from dtrain.models.layers import LayerConfig, activation_of, check_widths, init_module


@dataclass
class PerceptronConfig:
    name: str = "perceptron"
    init: str = "zeros"
    """Weight initialisation (see dtrain.models.layers.INITS)."""
    loss: str = "cross_entropy"
    """Classification loss: cross_entropy (softmax outputs) or perceptron (Rosenblatt's criterion: the margin by
    which the best wrong class beats the true one, zero once a sample is classified correctly)."""

    def __post_init__(self) -> None:
        if self.loss not in ("cross_entropy", "perceptron"):
            raise ConfigError(f"model.loss: expected cross_entropy or perceptron, got {self.loss!r}")


class Perceptron(CatalogModel):
    """One linear layer from inputs to outputs: a linear classifier or regressor (cannot represent XOR)."""

    def __init__(self, cfg: PerceptronConfig, meta: DataMeta) -> None:
        super().__init__()
        self.task, self.loss = meta.task, cfg.loss
        self.linear = nn.Linear(flat_dim(meta.input_shape), meta.num_classes or meta.output_dim or 1)
        init_module(self, cfg.init)

    def predict(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        if self.task != "classification" or self.loss == "cross_entropy":
            return supervised_step(self, batch, self.task)
        x, y = batch
        scores = self.predict(x).float()
        loss = (scores.max(dim=-1).values - scores.gather(1, y[:, None]).squeeze(1)).mean()
        acc = (scores.argmax(dim=-1) == y).float().mean()
        return StepOutput(loss, {"loss": loss.detach(), "acc": acc})


@dataclass
class MLPConfig(LayerConfig):
    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [128])
    """Width of each hidden layer."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_widths(self.hidden)


class MLP(CatalogModel):
    """Fully connected layers with a chosen activation and dropout, then a linear output layer."""

    def __init__(self, cfg: MLPConfig, meta: DataMeta) -> None:
        super().__init__()
        self.task = meta.task
        layers: list[nn.Module] = [nn.Flatten()]
        width = flat_dim(meta.input_shape)
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), activation_of(cfg)]
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, meta.num_classes or meta.output_dim or 1))
        self.net = nn.Sequential(*layers)
        init_module(self, cfg.init, cfg.activation)

    def predict(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        return supervised_step(self, batch, self.task)
