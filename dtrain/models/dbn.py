"""Deep belief network: greedy layer-wise RBM pre-training, then supervised fine-tuning, as engine stages."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dtrain.errors import ConfigError
from dtrain.models.base import CatalogModel, DataMeta, Stage, StepOutput, flat_dim, supervised_step
from dtrain.models.layers import check_dropout
from dtrain.models.rbm import UNITS, RBMLayer, check_stages, freeze_all_but, pretraining_stages, rbm_input


@dataclass
class DBNConfig:
    name: str = "dbn"
    hidden: list[int] = field(default_factory=lambda: [256, 128])
    """Width of each RBM layer, bottom to top."""
    visible: str = "bernoulli"
    """Units of the bottom RBM's visible layer: bernoulli (data in [0, 1]) or gaussian (standardised data)."""
    cd_k: int = 1
    """Gibbs steps of contrastive divergence."""
    init: str = "normal"
    """RBM weight initialisation (see dtrain.models.layers.INITS)."""
    pretrain_epochs: int | None = None
    """Epochs per RBM layer; null uses trainer.max_epochs."""
    pretrain_lr: float | None = None
    """Learning rate of pre-training; null uses optim.lr."""
    finetune_epochs: int | None = None
    """Epochs of supervised fine-tuning; null uses trainer.max_epochs."""
    finetune_lr: float | None = None
    """Learning rate of fine-tuning; null uses optim.lr."""
    dropout: float = 0.0
    """Dropout after each sigmoid layer during fine-tuning."""
    pretrain: bool = True
    """Run the RBM stages; false trains the same sigmoid network from its random initialisation (the ablation)."""

    def __post_init__(self) -> None:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"model.hidden: expected a non-empty list of integers >= 1, got {self.hidden!r}")
        if self.visible not in UNITS:
            raise ConfigError(f"model.visible: expected one of {', '.join(UNITS)}, got {self.visible!r}")
        check_stages(self)
        check_dropout(self.dropout)


class DBN(CatalogModel):
    """A stack of RBMs (stage ``rbm<i>`` trains layer i on the features of the layers below, all else frozen) whose
    weights then initialise a sigmoid classifier fine-tuned end to end (stage ``finetune``)."""

    def __init__(self, cfg: DBNConfig, meta: DataMeta) -> None:
        super().__init__()
        if meta.task != "classification":
            raise ConfigError(f"model.name=dbn: needs a classification data set, got a {meta.task} one")
        self.cfg = cfg
        widths = [flat_dim(meta.input_shape), *cfg.hidden]
        self.rbms = nn.ModuleList(
            RBMLayer(v, h, cfg.visible if i == 0 else "bernoulli", "bernoulli", cfg.init)
            for i, (v, h) in enumerate(zip(widths[:-1], widths[1:], strict=True)))
        self.head = nn.Linear(widths[-1], meta.num_classes)
        self.dropout = nn.Dropout(cfg.dropout)
        self.stage = "finetune"

    def shard_blocks(self) -> list[nn.Module]:
        return []  # the Gibbs chain reads W and its transpose outside the layer's forward: sharded whole

    def stages(self) -> list[Stage]:
        return pretraining_stages(self.cfg, len(self.rbms))

    def set_stage(self, stage: Stage) -> None:
        self.stage = stage.name
        if stage.name == "finetune":
            # The visible biases only matter to the RBMs' generative side; they take no part in classification.
            freeze_all_but(self, [r.linear for r in self.rbms] + [self.head])
        else:
            freeze_all_but(self, [self.rbms[int(stage.name[3:])]])

    def features(self, x: Tensor) -> Tensor:
        """Top-layer sigmoid activations (with dropout while training)."""
        h = x.flatten(1)
        for rbm in self.rbms:
            h = self.dropout(torch.sigmoid(rbm.linear(h)))
        return h

    def predict(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        if self.stage == "finetune":
            return supervised_step(self, batch, "classification")
        i = int(self.stage[3:])
        return self.rbms[i].cd_step(rbm_input(self.rbms, i, batch[0]), self.cfg.cd_k)
