"""The `module` catalog entry: any torch nn.Module whose forward takes the features, trained with a loss by name.

    model: {name: module, target: my_pkg.nets:Net, args: {width: 64}, loss: cross_entropy, metrics: [acc]}
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtrain.errors import ConfigError, DtrainError, check, first_line
from dtrain.models.base import CatalogModel, DataMeta, StepOutput
from dtrain.models.plugins import check_keywords, function_by_name, import_object, parameters

Loss = Callable[[Tensor, Tensor], Tensor]


def _cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.float(), y)


def _mse(out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out.float().reshape(y.shape), y.float())


def _bce_logits(out: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(out.float().reshape(y.shape), y.float())


def _acc(out: Tensor, y: Tensor) -> Tensor:
    if out.ndim >= 2 and out.shape[-1] > 1:  # class scores
        return (out.argmax(dim=-1) == y).float().mean()
    return ((out.reshape(y.shape) > 0) == (y > 0.5)).float().mean()  # one logit per sample (bce_logits)


def _mae(out: Tensor, y: Tensor) -> Tensor:
    return (out.float().reshape(y.shape) - y.float()).abs().mean()


# Losses are computed in float32, so they stay stable under mixed precision.
LOSSES: dict[str, Loss] = {"cross_entropy": _cross_entropy, "mse": _mse, "bce_logits": _bce_logits}
METRICS: dict[str, Loss] = {"acc": _acc, "mae": _mae}
DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse", "unsupervised": "mse"}
FROM_DATA = tuple(f.name for f in fields(DataMeta))
"""Constructor parameters with these names (DataMeta's fields) are filled from the data unless args sets them."""


@dataclass
class ModuleConfig:
    name: str = "module"
    target: str = ""
    """Import path of the nn.Module class (or a function returning one): my_pkg.nets:Net."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of target; parameters named input_shape, num_classes or output_dim come from the data
    when not given here."""
    loss: str | None = None
    """cross_entropy, mse, bce_logits, or an import path my_pkg.losses:fn taking (output, target); null = by task
    (cross_entropy for classification, else mse). Without targets the features are the target (autoencoders)."""
    metrics: list[str] = field(default_factory=list)
    """Logged beside the loss: acc, mae."""

    def __post_init__(self) -> None:
        check(bool(self.target), "model.target", "an import path module:Class of an nn.Module", self.target)
        factory = import_object(self.target, "model.target")
        check(callable(factory), "model.target", f"a class or function at {self.target}", type(factory).__name__)
        check_keywords(factory, self.args, lambda key: f"model.args.{key}", self.target)
        if self.loss is not None:
            loss_function(self.loss)
        for name in self.metrics:
            check(name in METRICS, "model.metrics", "names among " + ", ".join(METRICS), name)


def loss_function(name: str) -> Loss:
    """The loss called name: a built-in one, or the callable at an import path."""
    return function_by_name(name, LOSSES, "model.loss", "a function (output, target) -> loss")


def module_args(factory: Any, args: dict[str, Any], meta: DataMeta) -> dict[str, Any]:
    """args plus the data-derived parameters (FROM_DATA) the constructor takes and args leaves out."""
    params = parameters(factory) or {}
    derived = {k: getattr(meta, k) for k in FROM_DATA if k in params and k not in args}
    return {**derived, **args}


class ModuleAdapter(CatalogModel):
    """Wraps a plain nn.Module: forward(batch) runs it on the features, then the loss and metrics by name."""

    def __init__(self, cfg: ModuleConfig, meta: DataMeta) -> None:
        super().__init__()
        factory = import_object(cfg.target, "model.target")
        try:
            net = factory(**module_args(factory, cfg.args, meta))
        except DtrainError:
            raise
        except Exception as err:  # the user's constructor rejected its arguments: one line, not a traceback
            raise ConfigError(f"model.args: {cfg.target}(...) failed: {type(err).__name__}: "
                              f"{first_line(err)}") from None
        check(isinstance(net, nn.Module), "model.target", f"{cfg.target} to build a torch nn.Module",
              type(net).__name__)
        self.net = net
        self.loss_fn = loss_function(cfg.loss or DEFAULT_LOSS[meta.task])
        self.metric_fns = {name: METRICS[name] for name in cfg.metrics}

    def predict(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        out = self.net(batch[0])
        target = batch[-1]  # with no targets, (x,): the features themselves
        loss = self.loss_fn(out, target)
        metrics = {"loss": loss.detach()}
        metrics.update({name: fn(out.detach(), target).detach() for name, fn in self.metric_fns.items()})
        return StepOutput(loss, metrics)

    def probe(self, batch: tuple[Tensor, ...]) -> list[str]:
        """One step on a tiny batch, each part's failure named by its key (model.target, model.loss, metrics);
        returns the names of the metrics a step reports."""
        with torch.no_grad():
            out = _named_call("model.target", f"forward on a batch of {len(batch[0])} samples", self.net, batch[0])
            loss = _named_call("model.loss", "on the network's output", self.loss_fn, out, batch[-1])
            for name, fn in self.metric_fns.items():
                _named_call(f"model.metrics ({name})", "on the network's output", fn, out, batch[-1])
        if not (isinstance(loss, Tensor) and loss.numel() == 1):
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ConfigError(f"model.loss: expected a scalar tensor, got {got}")
        return ["loss", *self.metric_fns]


def _named_call(key: str, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except DtrainError:
        raise
    except Exception as err:
        raise ConfigError(f"{key}: {what} failed: {type(err).__name__}: {first_line(err)}") from None
