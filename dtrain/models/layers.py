"""Activations and weight initialisations selectable by name."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dtrain.errors import ConfigError, check


class _StepSTE(torch.autograd.Function):
    """Heaviside step forward, straight-through (identity, clipped to |x|<=1) gradient backward."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= 1).to(grad.dtype)


class BinaryStep(nn.Module):
    """Binary step 1[x > 0] with a straight-through gradient so it can be trained by backprop."""

    def forward(self, x: Tensor) -> Tensor:
        return _StepSTE.apply(x)


class Swish(nn.Module):
    """x * sigmoid(beta x); beta may be learned."""

    def __init__(self, beta: float = 1.0, learnable: bool = False) -> None:
        super().__init__()
        b = torch.tensor(float(beta))
        if learnable:
            self.beta = nn.Parameter(b)
        else:
            self.register_buffer("beta", b)

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(self.beta * x)


ACTIVATIONS = ("binary_step", "sigmoid", "tanh", "relu", "leaky_relu", "softmax", "swish", "identity")


def activation(name: str, *, slope: float = 0.01, beta: float = 1.0, learnable_beta: bool = False) -> nn.Module:
    """Build an activation by name (see ACTIVATIONS)."""
    table = {
        "binary_step": BinaryStep,
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "relu": nn.ReLU,
        "leaky_relu": lambda: nn.LeakyReLU(slope),
        "softmax": lambda: nn.Softmax(dim=-1),
        "swish": lambda: Swish(beta, learnable_beta),
        "identity": nn.Identity,
    }
    if name not in table:
        raise ConfigError(f"model.activation: expected one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return table[name]()


INITS = ("default", "zeros", "normal", "uniform", "xavier", "kaiming", "orthogonal", "lecun")


def init_weight(w: Tensor, name: str, nonlinearity: str = "relu") -> None:
    """Initialise one weight tensor in place by scheme name (see INITS)."""
    if name == "default":
        return
    if name == "zeros":
        nn.init.zeros_(w)
    elif name == "normal":
        nn.init.normal_(w, 0.0, 0.01)
    elif name == "uniform":
        nn.init.uniform_(w, -0.05, 0.05)
    elif name == "xavier":
        nn.init.xavier_uniform_(w)
    elif name == "kaiming":
        nl = nonlinearity if nonlinearity in ("relu", "leaky_relu") else "relu"
        nn.init.kaiming_uniform_(w, nonlinearity=nl)
    elif name == "orthogonal":
        nn.init.orthogonal_(w)
    elif name == "lecun":
        fan_in = w.shape[1] * (w[0][0].numel() if w.dim() > 2 else 1)
        nn.init.normal_(w, 0.0, 1.0 / math.sqrt(fan_in))
    else:
        raise ConfigError(f"model.init: expected one of {', '.join(INITS)}, got {name!r}")


def init_module(module: nn.Module, name: str, nonlinearity: str = "relu", recurrent: str | None = None) -> None:
    """Initialise the weights of every Linear/Conv/RNN layer in module; biases start at zero.

    Recurrent layers: input-to-hidden weights use `name`, hidden-to-hidden weights `recurrent` (default: `name`),
    one gate block at a time, so e.g. orthogonal makes each gate's recurrent matrix orthogonal.
    """
    recurrent = recurrent or name
    if name == "default" and recurrent == "default":
        return
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and name != "default":
            init_weight(m.weight, name, nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.RNN, nn.LSTM, nn.GRU)):
            for pname, p in m.named_parameters():
                scheme = recurrent if pname.startswith("weight_hh") else name
                if scheme == "default":
                    continue
                if pname.startswith("weight"):
                    for block in p.data.split(m.hidden_size):  # one block per gate
                        init_weight(block, scheme, "tanh")
                else:
                    nn.init.zeros_(p)


@dataclass
class LayerConfig:
    """The fields of models built from layers with one activation throughout (MLP, CNN): a base for their configs."""

    name: str = ""
    activation: str = "relu"
    """Hidden activation (see dtrain.models.layers.ACTIVATIONS)."""
    init: str = "kaiming"
    """Weight initialisation (see dtrain.models.layers.INITS)."""
    dropout: float = 0.0
    """Dropout probability (after each hidden activation; in a CNN before each fully connected layer)."""
    leaky_slope: float = 0.01
    """Negative slope of leaky_relu."""
    swish_beta: float = 1.0
    """beta of swish."""
    learnable_beta: bool = False
    """Learn swish's beta."""

    def __post_init__(self) -> None:
        check(self.activation in ACTIVATIONS, "model.activation", "one of " + ", ".join(ACTIVATIONS), self.activation)
        check(self.init in INITS, "model.init", "one of " + ", ".join(INITS), self.init)
        check_dropout(self.dropout)


def check_dropout(p: float) -> None:
    check(0 <= p < 1, "model.dropout", "a number in [0, 1)", p)


def check_widths(widths: list[int], key: str = "model.hidden") -> None:
    """Layer widths: a list of integers >= 1 (empty: no such layers)."""
    check(all(w >= 1 for w in widths), key, "a list of integers >= 1", list(widths))


def activation_of(cfg: LayerConfig) -> nn.Module:
    """The activation a layer config names."""
    return activation(cfg.activation, slope=cfg.leaky_slope, beta=cfg.swish_beta, learnable_beta=cfg.learnable_beta)

