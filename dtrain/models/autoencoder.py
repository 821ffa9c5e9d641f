"""Autoencoders: encoder -> code -> decoder trained to reconstruct their input (labels, if any, are ignored)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtrain.errors import ConfigError
from dtrain.models.base import CatalogModel, DataMeta, Stage, StepOutput, flat_dim
from dtrain.models.layers import activation, check_dropout, init_module
from dtrain.models.rbm import RBMLayer, check_stages, freeze_all_but, pretraining_stages, rbm_input


def _stack(widths: list[int], hidden_act: str, last_act: str, dropout: float) -> nn.Sequential:
    """Linear layers through widths; hidden_act (+ dropout) between them, last_act after the last one."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        last = i == len(widths) - 2
        layers += [nn.Linear(a, b), activation(last_act if last else hidden_act)]
        if dropout > 0 and not last:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def reconstruction_step(x: Tensor, recon: Tensor) -> StepOutput:
    """Mean squared reconstruction error per feature (the loss) and per sample (summed over features)."""
    x, recon = x.flatten(1).float(), recon.float()
    loss = F.mse_loss(recon, x)
    per_sample = ((recon - x) ** 2).sum(-1).mean()
    return StepOutput(loss, {"loss": loss.detach(), "mse": loss.detach(), "sq_error": per_sample.detach()})


@dataclass
class AutoencoderConfig:
    name: str = "autoencoder"
    hidden: list[int] = field(default_factory=lambda: [64])
    """Encoder hidden widths, input side first; the decoder mirrors them."""
    code: int = 8
    """Width of the code (bottleneck) layer."""
    activation: str = "relu"
    """Hidden activation (see dtrain.models.layers.ACTIVATIONS)."""
    code_activation: str = "identity"
    """Activation of the code layer."""
    output_activation: str = "identity"
    """Activation of the reconstruction: identity for standardised data, sigmoid for data in [0, 1]."""
    init: str = "xavier"
    """Weight initialisation (see dtrain.models.layers.INITS)."""
    dropout: float = 0.0
    """Dropout after each hidden activation."""

    def __post_init__(self) -> None:
        if self.code < 1 or any(h < 1 for h in self.hidden):
            raise ConfigError(f"model.code/hidden: expected integers >= 1, got {self.code!r} / {self.hidden!r}")
        check_dropout(self.dropout)


class Autoencoder(CatalogModel):
    """encoder (hidden..., code) and a mirrored decoder; ``predict`` reconstructs, ``encode`` gives the code."""

    def __init__(self, cfg: AutoencoderConfig, meta: DataMeta) -> None:
        super().__init__()
        widths = [flat_dim(meta.input_shape), *cfg.hidden, cfg.code]
        self.encoder = _stack(widths, cfg.activation, cfg.code_activation, cfg.dropout)
        self.decoder = _stack(widths[::-1], cfg.activation, cfg.output_activation, cfg.dropout)
        init_module(self, cfg.init, cfg.activation)

    def encode(self, x: Tensor) -> Tensor:
        """The code of x."""
        return self.encoder(x.flatten(1))

    def predict(self, x: Tensor) -> Tensor:
        return self.decoder(self.encode(x))

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        return reconstruction_step(batch[0], self.predict(batch[0]))


@dataclass
class DeepAutoencoderConfig:
    name: str = "deep_autoencoder"
    layers: list[int] = field(default_factory=lambda: [128, 64, 16])
    """Encoder widths, input side first; the last is the code. The decoder is the mirror image."""
    activation: str = "sigmoid"
    """Hidden activation; RBM pre-training needs sigmoid."""
    code_activation: str = "identity"
    """identity (pre-trained as a Gaussian-hidden RBM) or sigmoid (Bernoulli-hidden)."""
    output_activation: str = "sigmoid"
    """sigmoid for data in [0, 1] (Bernoulli visible units), identity for standardised data (Gaussian)."""
    init: str = "xavier"
    """Initialisation of the layers that pre-training does not set."""
    dropout: float = 0.0
    """Dropout after each hidden activation during fine-tuning."""
    pretrain: bool = False
    """Greedy RBM pre-training of the encoder, unrolled into the decoder (Hinton & Salakhutdinov, 2006)."""
    cd_k: int = 1
    """Gibbs steps of contrastive divergence in pre-training."""
    pretrain_epochs: int | None = None
    """Epochs per RBM; null uses trainer.max_epochs."""
    pretrain_lr: float | None = None
    """Learning rate of pre-training; null uses optim.lr."""
    finetune_epochs: int | None = None
    """Epochs of reconstruction fine-tuning; null uses trainer.max_epochs."""
    finetune_lr: float | None = None
    """Learning rate of fine-tuning; null uses optim.lr."""

    def __post_init__(self) -> None:
        if not self.layers or any(w < 1 for w in self.layers):
            raise ConfigError(f"model.layers: expected a non-empty list of integers >= 1, got {self.layers!r}")
        check_stages(self)
        check_dropout(self.dropout)
        if self.pretrain:
            if self.activation != "sigmoid" and len(self.layers) > 1:
                raise ConfigError(f"model.activation: RBM pre-training needs sigmoid, got {self.activation!r}")
            if self.code_activation not in ("identity", "sigmoid"):
                raise ConfigError("model.code_activation: RBM pre-training needs identity or sigmoid, "
                                  f"got {self.code_activation!r}")
            if self.output_activation not in ("identity", "sigmoid"):
                raise ConfigError("model.output_activation: RBM pre-training needs identity or sigmoid, "
                                  f"got {self.output_activation!r}")


class DeepAutoencoder(CatalogModel):
    """A symmetric deep autoencoder; with ``pretrain`` the encoder layers are RBMs trained one per stage, then the
    decoder starts from their transposed weights and visible biases and everything is fine-tuned on reconstruction."""

    def __init__(self, cfg: DeepAutoencoderConfig, meta: DataMeta) -> None:
        super().__init__()
        self.cfg = cfg
        widths = [flat_dim(meta.input_shape), *cfg.layers]
        n = len(cfg.layers)
        units = {"sigmoid": "bernoulli", "identity": "gaussian"}
        self.rbms = nn.ModuleList(
            RBMLayer(v, h, units.get(cfg.output_activation if i == 0 else "sigmoid", "gaussian"),
                     units.get(cfg.code_activation if i == n - 1 else "sigmoid", "gaussian"), "normal")
            for i, (v, h) in enumerate(zip(widths[:-1], widths[1:], strict=True)))
        pairs = list(zip(widths[:-1], widths[1:], strict=True))
        self.decoder = nn.ModuleList(nn.Linear(h, v) for v, h in reversed(pairs))
        self.acts = nn.ModuleList(activation(cfg.code_activation if i == n - 1 else cfg.activation) for i in range(n))
        self.dec_acts = nn.ModuleList(
            activation(cfg.output_activation if i == n - 1 else cfg.activation) for i in range(n))
        self.dropout = nn.Dropout(cfg.dropout)
        if not cfg.pretrain:
            init_module(self, cfg.init, cfg.activation)
        self.stage = "finetune"

    def shard_blocks(self) -> list[nn.Module]:
        return []  # the Gibbs chain reads W and its transpose outside the layer's forward: sharded whole

    def stages(self) -> list[Stage]:
        return pretraining_stages(self.cfg, len(self.rbms))

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage.name
        if stage.name != "finetune":
            freeze_all_but(self, [self.rbms[int(stage.name[3:])]])
            return
        if self.cfg.pretrain:
            self._unroll()
        freeze_all_but(self, [r.linear for r in self.rbms] + list(self.decoder))

    @torch.no_grad()
    def _unroll(self) -> None:
        # Decoder layer j mirrors encoder RBM n-1-j: weight Wᵀ, bias the RBM's visible bias.
        for dec, rbm in zip(self.decoder, reversed(self.rbms), strict=True):
            dec.weight.copy_(rbm.linear.weight.t())
            dec.bias.copy_(rbm.v_bias)

    def encode(self, x: Tensor) -> Tensor:
        """The code of x."""
        h = x.flatten(1)
        for i, (rbm, act) in enumerate(zip(self.rbms, self.acts, strict=True)):
            h = act(rbm.linear(h))
            h = self.dropout(h) if i < len(self.rbms) - 1 else h
        return h

    def predict(self, x: Tensor) -> Tensor:
        h = self.encode(x)
        for i, (dec, act) in enumerate(zip(self.decoder, self.dec_acts, strict=True)):
            h = act(dec(h))
            h = self.dropout(h) if i < len(self.decoder) - 1 else h
        return h

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        if self.stage == "finetune":
            return reconstruction_step(batch[0], self.predict(batch[0]))
        i = int(self.stage[3:])
        return self.rbms[i].cd_step(rbm_input(self.rbms, i, batch[0]), self.cfg.cd_k)
