"""The model catalog: one explicit registry from name to (config class, model class), and the one lookup that also
finds user models by `module:attr` import path or through the `dtrain.models` entry point group."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dtrain.errors import ConfigError, DtrainError, first_line
from dtrain.models.autoencoder import Autoencoder, AutoencoderConfig, DeepAutoencoder, DeepAutoencoderConfig
from dtrain.models.base import CatalogModel, DataMeta, Stage, StepOutput
from dtrain.models.cnn import CNN, CNNConfig
from dtrain.models.dbn import DBN, DBNConfig
from dtrain.models.mlp import MLP, MLPConfig, Perceptron, PerceptronConfig
from dtrain.models.module import ModuleAdapter, ModuleConfig
from dtrain.models.plugins import config_class_of, describe, is_import_path, model_class_at, plugin_entry_points
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
    "module": (ModuleConfig, ModuleAdapter, "any torch nn.Module (model.target: my_pkg.nets:Net) with a loss by name"),
}


def lookup_model(name: str) -> tuple[type, type, str]:
    """(config dataclass, model class, description) for a catalog name, a `module:attr` import path of a
    CatalogModel subclass, or a name registered in the `dtrain.models` entry point group (catalog names win)."""
    if name in MODELS:
        return MODELS[name]
    if is_import_path(name):
        cls = model_class_at(name)
        return config_class_of(cls, name), cls, describe(cls)
    plugins = plugin_entry_points()
    if name in plugins:
        key = f"model.name: plugin {name!r} ({plugins[name].value})"
        cls = model_class_at(plugins[name].value, key)
        return config_class_of(cls, name, key), cls, describe(cls)
    known = ", ".join([*sorted(MODELS), *sorted(plugins)])
    raise ConfigError(f"model.name: expected one of {known}, or an import path module:Class, got {name!r}")


def runs_user_code(name: str) -> bool:
    """Whether model `name` runs the user's code (an import path, a plugin, or the module adapter's target), which
    check_step tries once on the driver."""
    return name not in MODELS or name == "module"


def model_config_class(name: str) -> type:
    """The config dataclass of model `name` (see lookup_model)."""
    return lookup_model(name)[0]


def build_model(cfg: Any, meta: DataMeta) -> CatalogModel:
    """Build the model described by cfg (its config dataclass, see lookup_model) for data described by meta."""
    model_cls = lookup_model(cfg.name)[1]
    if cfg.name in MODELS:  # dtrain's own code (the module adapter names the user's errors itself)
        return model_cls(cfg, meta)
    try:
        return model_cls(cfg, meta)
    except DtrainError:
        raise
    except Exception as err:  # the user's constructor: one line naming the key, not a traceback
        raise ConfigError(f"model.name: building {cfg.name} failed: {type(err).__name__}: {first_line(err)}") from None


def check_step(model: CatalogModel, batch: tuple[Tensor, ...], key: str = "model.name") -> list[str]:
    """Run one forward on a tiny batch and check it keeps the contract (returns StepOutput with a scalar loss), so
    a model that breaks it fails on the driver in one line instead of in every worker. Returns the names of the
    metrics the step reports."""
    if isinstance(model, ModuleAdapter):
        return model.probe(batch)
    try:
        with torch.no_grad():
            out = model(batch)
    except DtrainError:
        raise
    except Exception as err:
        raise ConfigError(f"{key}: forward on a batch of {len(batch[0])} samples failed: "
                          f"{type(err).__name__}: {first_line(err)}") from None
    if not isinstance(out, StepOutput):
        hint = " (a plain nn.Module trains through `name: module, target: ...`)" if key == "model.name" else ""
        raise ConfigError(f"{key}: forward(batch) returned {type(out).__name__}, expected a "
                          f"dtrain.models.StepOutput(loss, metrics){hint}")
    if not (isinstance(out.loss, Tensor) and out.loss.numel() == 1):
        shape = tuple(out.loss.shape) if isinstance(out.loss, Tensor) else type(out.loss).__name__
        raise ConfigError(f"{key}: forward(batch).loss must be a scalar tensor, got {shape}")
    return list(out.metrics)


def step_metrics(cfg: Any, meta: DataMeta, batch: tuple[Tensor, ...]) -> list[str]:
    """The names of the metrics model cfg's training step reports on data like batch (a few samples): the user's
    code runs one real step (check_step, which also proves it keeps the contract); dtrain's catalog models step on
    the meta device, where nothing is allocated or computed."""
    if runs_user_code(cfg.name):
        return check_step(build_model(cfg, meta), batch)
    with torch.device("meta"):
        return check_step(build_model(cfg, meta), tuple(torch.as_tensor(t, device="meta") for t in batch))


__all__ = ["MODELS", "CatalogModel", "DataMeta", "Stage", "StepOutput", "build_model", "check_step", "lookup_model",
           "model_config_class", "runs_user_code", "step_metrics"]
