"""The model catalog: one explicit registry from name to (config class, model class)."""

from __future__ import annotations

from typing import Any

from dtrain.errors import ConfigError
from dtrain.models.autoencoder import Autoencoder, AutoencoderConfig, DeepAutoencoder, DeepAutoencoderConfig
from dtrain.models.base import CatalogModel, DataMeta, Stage, StepOutput
from dtrain.models.cnn import CNN, CNNConfig
from dtrain.models.dbn import DBN, DBNConfig
from dtrain.models.mlp import MLP, MLPConfig, Perceptron, PerceptronConfig
from dtrain.models.rbm import RBM, RBMConfig
from dtrain.models.recurrent import LSTMConfig, Recurrent, RNNConfig
from dtrain.models.som import SOM, SOMConfig

# name -> (config dataclass, model class, one-line description)
MODELS: dict[str, tuple[type, type, str]] = {
    "perceptron": (PerceptronConfig, Perceptron, "single linear layer classifier/regressor"),
    "mlp": (MLPConfig, MLP, "multi-layer perceptron with activation, init and dropout by name"),
    "cnn": (CNNConfig, CNN, "convolutional network: conv, activation, pooling blocks, then fully connected"),
    "rnn": (RNNConfig, Recurrent, "vanilla (Elman) recurrent network over (seq_len, channels) sequences"),
    "lstm": (LSTMConfig, Recurrent, "long short-term memory network over (seq_len, channels) sequences"),
    "autoencoder": (AutoencoderConfig, Autoencoder, "encoder -> code -> decoder trained on reconstruction"),
    "deep_autoencoder": (DeepAutoencoderConfig, DeepAutoencoder,
                         "symmetric deep autoencoder, optional greedy RBM pre-training then fine-tuning"),
    "rbm": (RBMConfig, RBM, "restricted Boltzmann machine trained by CD-k as a free-energy loss"),
    "dbn": (DBNConfig, DBN, "deep belief network: RBM stages, then supervised fine-tuning"),
    "som": (SOMConfig, SOM, "self-organizing map (online or all-reduced batch update)"),
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
