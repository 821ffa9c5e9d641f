"""Recurrent networks: the vanilla (Elman) RNN and the LSTM, reading sequences shaped (seq_len, channels)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from dtrain.errors import ConfigError, check
from dtrain.models.base import CatalogModel, DataMeta, StepOutput, supervised_step
from dtrain.models.layers import INITS, check_dropout, init_module


@dataclass
class RecurrentConfig:
    """The fields the RNN and the LSTM share."""

    name: str = ""
    hidden_size: int = 32
    """Units in each recurrent layer."""
    num_layers: int = 1
    """Stacked recurrent layers."""
    init: str = "default"
    """Initialisation of input-to-hidden and output weights (see dtrain.models.layers.INITS); default: PyTorch's."""
    recurrent_init: str = "default"
    """Initialisation of the hidden-to-hidden weights, e.g. orthogonal; default: PyTorch's."""
    dropout: float = 0.0
    """Dropout between stacked layers and before the output layer."""

    def __post_init__(self) -> None:
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ConfigError(f"model.hidden_size/num_layers: expected integers >= 1, got {self.hidden_size} "
                              f"and {self.num_layers}")
        check(self.init in INITS, "model.init", "one of " + ", ".join(INITS), self.init)
        check(self.recurrent_init in INITS, "model.recurrent_init", "one of " + ", ".join(INITS), self.recurrent_init)
        check_dropout(self.dropout)


@dataclass
class RNNConfig(RecurrentConfig):
    name: str = "rnn"
    nonlinearity: str = "tanh"
    """Activation of the vanilla RNN cell: tanh or relu."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.nonlinearity in ("tanh", "relu"), "model.nonlinearity", "tanh or relu", self.nonlinearity)


@dataclass
class LSTMConfig(RecurrentConfig):
    name: str = "lstm"
    forget_bias: float = 1.0
    """Initial forget-gate bias; 1 lets the cell remember from the start (Jozefowicz et al. 2015)."""


class Recurrent(CatalogModel):
    """A recurrent layer stack whose last hidden state feeds a linear output layer (class logits or forecasts)."""

    def __init__(self, cfg: RecurrentConfig, meta: DataMeta) -> None:
        super().__init__()
        self.task = meta.task
        shape = tuple(meta.input_shape)
        if len(shape) not in (1, 2):
            raise ConfigError(f"model.name={cfg.name}: expected sequences shaped (seq_len, channels), got samples "
                              f"of shape {shape}")
        channels = shape[1] if len(shape) == 2 else 1
        dropout = cfg.dropout if cfg.num_layers > 1 else 0.0
        if isinstance(cfg, LSTMConfig):
            self.rnn: nn.RNNBase = nn.LSTM(channels, cfg.hidden_size, cfg.num_layers, batch_first=True,
                                           dropout=dropout)
        else:
            self.rnn = nn.RNN(channels, cfg.hidden_size, cfg.num_layers, nonlinearity=cfg.nonlinearity,
                              batch_first=True, dropout=dropout)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, meta.num_classes or meta.output_dim or 1)
        init_module(self, cfg.init, "tanh", recurrent=cfg.recurrent_init)
        if isinstance(cfg, LSTMConfig):
            self._set_forget_bias(cfg.forget_bias)

    def _set_forget_bias(self, value: float) -> None:
        # PyTorch's gate order is input, forget, cell, output; the two bias vectors add, so set one, zero the other.
        h = self.rnn.hidden_size
        for name, p in self.rnn.named_parameters():
            if name.startswith("bias_ih"):
                p.data[h:2 * h] = value
            elif name.startswith("bias_hh"):
                p.data[h:2 * h] = 0.0

    def predict(self, x: Tensor) -> Tensor:
        if x.dim() == 2:  # (N, seq_len): one channel
            x = x.unsqueeze(-1)
        out, _ = self.rnn(x)
        return self.head(self.drop(out[:, -1]))

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        return supervised_step(self, batch, self.task)
