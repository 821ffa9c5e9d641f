"""Restricted Boltzmann machine trained by contrastive divergence, expressed as a loss.

For an RBM with free energy F(v), the CD-k update is <dF/dθ>_{v_k} - <dF/dθ>_{data}, where v_k is the visible
state after k Gibbs steps started at the data. So backpropagating ``F(v_data).mean() - F(v_k.detach()).mean()``
gives exactly the CD-k gradient, and any optimizer, strategy (DDP all-reduce, DeepSpeed) and precision applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtrain.errors import ConfigError, check
from dtrain.models.base import CatalogModel, DataMeta, Stage, StepOutput, flat_dim
from dtrain.models.layers import init_weight

UNITS = ("bernoulli", "gaussian")


class RBMLayer(nn.Module):
    """One RBM: ``linear`` (weight W of shape hidden x visible, hidden bias c) plus a visible bias b.

    Bernoulli units are binary with sigmoid means; Gaussian units have unit variance and linear means. The energy
    is E(v, h) = vis(v) - c·h - hᵀWv with vis(v) = -b·v (Bernoulli) or ||v - b||²/2 (Gaussian); summing out h gives
    the free energy F(v) = vis(v) - Σ_j A(Wv + c)_j with A = softplus (Bernoulli h) or x²/2 (Gaussian h).
    ``linear`` is an ordinary layer, so a DBN or deep autoencoder uses the pretrained weights directly.
    """

    def __init__(self, n_visible: int, n_hidden: int, visible: str = "bernoulli", hidden: str = "bernoulli",
                 init: str = "normal") -> None:
        super().__init__()
        for key, value in (("visible", visible), ("hidden", hidden)):
            if value not in UNITS:
                raise ConfigError(f"model.{key}: expected one of {', '.join(UNITS)}, got {value!r}")
        self.visible, self.hidden = visible, hidden
        self.linear = nn.Linear(n_visible, n_hidden)
        self.v_bias = nn.Parameter(torch.zeros(n_visible))
        init_weight(self.linear.weight, init, "sigmoid")
        nn.init.zeros_(self.linear.bias)

    def hidden_mean(self, v: Tensor) -> Tensor:
        """E[h | v]: sigmoid (Bernoulli) or linear (Gaussian) of Wv + c; also the feature map."""
        pre = self.linear(v.to(self.linear.weight.dtype))  # the weights' dtype: bf16/fp16 under DeepSpeed
        return torch.sigmoid(pre) if self.hidden == "bernoulli" else pre

    def visible_mean(self, h: Tensor) -> Tensor:
        """E[v | h]."""
        pre = F.linear(h.to(self.v_bias.dtype), self.linear.weight.t(), self.v_bias)
        return torch.sigmoid(pre) if self.visible == "bernoulli" else pre

    @staticmethod
    def _sample(mean: Tensor, kind: str) -> Tensor:
        return torch.bernoulli(mean) if kind == "bernoulli" else mean + torch.randn_like(mean)

    def free_energy(self, v: Tensor) -> Tensor:
        """F(v) per sample (float32)."""
        v = v.float()
        pre = F.linear(v, self.linear.weight.float(), self.linear.bias.float())
        b = self.v_bias.float()
        vis = -(v @ b) if self.visible == "bernoulli" else 0.5 * ((v - b) ** 2).sum(-1)
        hid = F.softplus(pre).sum(-1) if self.hidden == "bernoulli" else 0.5 * (pre**2).sum(-1)
        return vis - hid

    @torch.no_grad()
    def gibbs(self, v: Tensor, k: int, sample_visible: bool = False) -> Tensor:
        """v_k after k alternating Gibbs steps from v: h ~ p(h|v), then v = E[v|h] (or a sample of it)."""
        for _ in range(k):
            h = self._sample(self.hidden_mean(v), self.hidden)
            v = self.visible_mean(h)
            if sample_visible:
                v = self._sample(v, self.visible)
        return v

    def cd_step(self, v: Tensor, k: int, sample_visible: bool = False) -> StepOutput:
        """CD-k as a loss (see module doc) with reconstruction error and mean free energy as metrics."""
        v = v.flatten(1).float()
        v_k = self.gibbs(v, k, sample_visible)
        f_data = self.free_energy(v)
        loss = f_data.mean() - self.free_energy(v_k.detach()).mean()
        with torch.no_grad():
            recon = self.visible_mean(self.hidden_mean(v))
            recon_error = ((recon.float() - v) ** 2).sum(-1).mean()
        return StepOutput(loss, {"loss": loss.detach(), "recon_error": recon_error,
                                 "free_energy": f_data.mean().detach()})


@dataclass
class RBMConfig:
    name: str = "rbm"
    hidden: int = 128
    """Hidden units."""
    cd_k: int = 1
    """Gibbs steps of contrastive divergence (CD-k)."""
    visible: str = "bernoulli"
    """Visible units: bernoulli (data in [0, 1], e.g. data.minmax=true) or gaussian (standardised data)."""
    sample_visible: bool = False
    """Sample the visible units in the Gibbs chain instead of using their means."""
    init: str = "normal"
    """Weight initialisation (see dtrain.models.layers.INITS); normal is N(0, 0.01²), Hinton's recipe."""

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"model.hidden: expected an integer >= 1, got {self.hidden!r}")
        if self.cd_k < 1:
            raise ConfigError(f"model.cd_k: expected an integer >= 1, got {self.cd_k!r}")
        if self.visible not in UNITS:
            raise ConfigError(f"model.visible: expected one of {', '.join(UNITS)}, got {self.visible!r}")


class RBM(CatalogModel):
    """A Bernoulli-hidden RBM trained by CD-k; ``predict`` returns the hidden probabilities (features)."""

    def __init__(self, cfg: RBMConfig, meta: DataMeta) -> None:
        super().__init__()
        self.cfg = cfg
        self.rbm = RBMLayer(flat_dim(meta.input_shape), cfg.hidden, cfg.visible, "bernoulli", cfg.init)

    def shard_blocks(self) -> list[nn.Module]:
        return []  # the Gibbs chain reads W and its transpose outside the layer's forward: sharded whole

    def predict(self, x: Tensor) -> Tensor:
        return self.rbm.hidden_mean(x.flatten(1))

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        return self.rbm.cd_step(batch[0], self.cfg.cd_k, self.cfg.sample_visible)


def rbm_input(layers: nn.ModuleList, index: int, x: Tensor) -> Tensor:
    """The data seen by RBM `index` of a stack: x passed through the (frozen) mean hidden maps of those below."""
    with torch.no_grad():
        v = x.flatten(1).float()
        for layer in layers[:index]:
            v = layer.hidden_mean(v)
    return v


def freeze_all_but(model: nn.Module, trainable: list[nn.Module]) -> None:
    """requires_grad only for the parameters of `trainable` (the engine builds each stage's optimizer from them)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)


def check_stages(cfg: object) -> None:
    """The fields pretraining_stages reads (DBN and deep autoencoder): epochs >= 1 and learning rates > 0, or null
    for trainer.max_epochs and optim.lr; cd_k >= 1."""
    check(cfg.cd_k >= 1, "model.cd_k", "an integer >= 1", cfg.cd_k)
    for key in ("pretrain_epochs", "finetune_epochs"):
        value = getattr(cfg, key)
        check(value is None or value >= 1, f"model.{key}", "an integer >= 1 or null (trainer.max_epochs)", value)
    for key in ("pretrain_lr", "finetune_lr"):
        value = getattr(cfg, key)
        check(value is None or value > 0, f"model.{key}", "a number > 0 or null (optim.lr)", value)


def pretraining_stages(cfg: object, n_rbms: int) -> list[Stage]:
    """Greedy layer-wise RBM stages (when cfg.pretrain), then fine-tuning: the stages of DBN and deep autoencoder."""
    pre = [Stage(f"rbm{i}", cfg.pretrain_epochs, cfg.pretrain_lr) for i in range(n_rbms)] if cfg.pretrain else []
    return pre + [Stage("finetune", cfg.finetune_epochs, cfg.finetune_lr)]
