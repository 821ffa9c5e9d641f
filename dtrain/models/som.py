"""Kohonen self-organizing map trained through the ordinary engine.

online: the loss ½·η(t)·Σ_j h(bmu(x), j)·||x - w_j||² with the best-matching unit chosen without gradient has
gradient η(t)·h·(w_j - x), so one SGD step (no momentum) on one sample is the classic SOM rule
w_j += lr·η(t)·h·(x - w_j); on a batch it is the batch mean of that rule, and DDP's gradient average makes it the mean
over the global batch.
batch: each step pulls w_j towards the neighbourhood-weighted mean of the batch, with the sums all-reduced across
ranks first; with SGD and lr=1 this is the batch SOM update w_j = Σ h x / Σ h over the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dtrain.errors import ConfigError
from dtrain.models.base import CatalogModel, DataMeta, StepOutput, flat_dim
from dtrain.models.layers import init_weight

ADJACENT = 1.42
"""Grid distance up to which the two best units count as neighbours (diagonals included), as in MiniSom."""


@dataclass
class SOMConfig:
    name: str = "som"
    rows: int = 8
    """Grid rows."""
    cols: int = 8
    """Grid columns."""
    sigma: float = 1.5
    """Initial radius of the Gaussian neighbourhood, in grid units."""
    decay_steps: int = 1000
    """T of the asymptotic decay sigma(t) = sigma / (1 + 2t/T), which also scales the loss by 1 / (1 + 2t/T) (the
    learning-rate decay of MiniSom); t counts training steps. Set it near the run's total steps; 0 disables decay."""
    update: str = "online"
    """online (gradient of the neighbourhood-weighted loss) or batch (all-reduced batch SOM update)."""
    init: str = "uniform"
    """Initialisation of the unit weights (see dtrain.models.layers.INITS)."""

    def __post_init__(self) -> None:
        if self.rows < 1 or self.cols < 1 or self.rows * self.cols < 2:
            raise ConfigError(f"model.rows/cols: expected a grid of at least 2 units, got {self.rows}x{self.cols}")
        if self.sigma <= 0:
            raise ConfigError(f"model.sigma: expected a number > 0, got {self.sigma!r}")
        if self.decay_steps < 0:
            raise ConfigError(f"model.decay_steps: expected an integer >= 0, got {self.decay_steps!r}")
        if self.update not in ("online", "batch"):
            raise ConfigError(f"model.update: expected online or batch, got {self.update!r}")


class SOM(CatalogModel):
    """rows x cols units with weight vectors in input space; ``predict`` gives each sample's best-matching unit."""

    def __init__(self, cfg: SOMConfig, meta: DataMeta) -> None:
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.rows * cfg.cols, flat_dim(meta.input_shape)))
        init_weight(self.weight, cfg.init)
        rc = torch.stack(torch.meshgrid(torch.arange(cfg.rows), torch.arange(cfg.cols), indexing="ij"), -1)
        coords = rc.reshape(-1, 2).float()
        self.register_buffer("grid_d2", torch.cdist(coords, coords) ** 2, persistent=False)
        # Training steps so far: drives the decay, and travels in checkpoints so a resumed run continues it.
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def decay(self) -> Tensor:
        """1 / (1 + 2t/T): the factor on sigma and on the step size now (a device tensor: no host read-back)."""
        if self.cfg.decay_steps == 0:
            return torch.ones((), device=self.steps.device)
        return 1.0 / (1.0 + 2.0 / self.cfg.decay_steps * self.steps)

    def sq_distances(self, x: Tensor) -> Tensor:
        """||x - w_j||² for every sample and unit (B x units), differentiable in the weights."""
        x, w = x.flatten(1).float(), self.weight.float()
        return ((x * x).sum(-1, keepdim=True) - 2 * x @ w.t() + (w * w).sum(-1)).clamp_min(0)

    def predict(self, x: Tensor) -> Tensor:
        return self.sq_distances(x).argmin(-1)

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        x = batch[0].flatten(1).float()
        d2 = self.sq_distances(x)
        eta = self.decay()
        with torch.no_grad():
            best2 = d2.topk(2, dim=-1, largest=False).indices
            bmu = best2[:, 0]
            sigma = self.cfg.sigma * eta
            h = torch.exp(-self.grid_d2[bmu] / (2 * sigma * sigma))
            quant = d2.gather(1, bmu[:, None]).sqrt().mean()
            topo = (self.grid_d2[bmu, best2[:, 1]] > ADJACENT**2).float().mean()
        distortion = 0.5 * (h * d2).sum(-1).mean()
        training = self.training and torch.is_grad_enabled()
        if training and self.cfg.update == "batch":
            loss = eta * self._batch_loss(x, h)
        else:
            loss = eta * distortion
        if training:
            self.steps += 1
        return StepOutput(loss, {"loss": distortion.detach(), "quant_error": quant, "topo_error": topo})

    def _batch_loss(self, x: Tensor, h: Tensor) -> Tensor:
        # ½||w_j - m_j||² with m_j the neighbourhood-weighted mean of the global batch: its gradient is w_j - m_j,
        # identical on every rank, so DDP's average leaves it unchanged.
        with torch.no_grad():
            sums = torch.cat([h.t() @ x, h.sum(0)[:, None]], dim=1)
            self.all_reduce_sum(sums)
            den = sums[:, -1:]
            target = sums[:, :-1] / den.clamp_min(1e-12)
            used = (den[:, 0] > 1e-12).float()
        return 0.5 * (((self.weight.float() - target) ** 2).sum(-1) * used).sum()
