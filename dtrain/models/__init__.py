"""The model catalog: one explicit registry from name to (config class, model class)."""

from __future__ import annotations

from typing import Any

from dtrain.errors import ConfigError
from dtrain.models.base import CatalogModel, DataMeta, Stage, StepOutput
from dtrain.models.mlp import MLP, MLPConfig, Perceptron, PerceptronConfig

# name -> (config dataclass, model class, one-line description)
MODELS: dict[str, tuple[type, type, str]] = {
    "perceptron": (PerceptronConfig, Perceptron, "single linear layer classifier/regressor"),
    "mlp": (MLPConfig, MLP, "multi-layer perceptron with activation, init and dropout by name"),
}


def model_config_class(name: str) -> type:
    """The config dataclass registered for model `name`."""
    if name not in MODELS:
        raise ConfigError(f"model.name: expected one of {', '.join(sorted(MODELS))}, got {name!r}")
    return MODELS[name][0]


def build_model(cfg: Any, meta: DataMeta) -> CatalogModel:
    """Build the catalog model described by cfg (its registered config dataclass) for data described by meta."""
    return MODELS[cfg.name][1](cfg, meta)


__all__ = ["MODELS", "CatalogModel", "DataMeta", "Stage", "StepOutput", "build_model", "model_config_class"]
