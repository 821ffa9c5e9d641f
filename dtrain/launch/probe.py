"""trainer.linear_probe: how well a model's features classify. After training, a logistic regression is fitted on
the features the model gives (its predict) of the training split, its inverse L2 strength C chosen on the validation
split, and its accuracy on the test split is reported as test/probe_acc: for a model trained without labels (an RBM's
hidden units), the downstream score comes from the run itself. Rank 0 fits it, with scikit-learn."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from dtrain.data.base import DataBundle
from dtrain.errors import ConfigError
from dtrain.models import build_model

PROBE_C = (1.0, 10.0, 100.0)
"""The values of C tried (scikit-learn's LogisticRegression; 1.0 is its default)."""


def check_probe(data: DataBundle) -> None:
    """ConfigError unless the data has class labels (checked before training; streamed data is refused by the job's
    own check, in dtrain.config)."""
    if data.meta.task != "classification" or data.meta.num_classes < 2 or len(data.train) < 2:
        raise ConfigError("trainer.linear_probe: needs a data set with class labels (this one has "
                          f"{data.meta.task} targets); set trainer.linear_probe=false")


def probe_accuracy(features: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(validation accuracy, test accuracy, C) of a logistic regression fitted on features["train"], C chosen
    from PROBE_C on the validation split."""
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings: max_iter bounds the fit's time
        fits = {c: LogisticRegression(C=c, max_iter=2000).fit(features["train"], labels["train"]) for c in PROBE_C}
    c = max(PROBE_C, key=lambda c: fits[c].score(features["val"], labels["val"]))
    return float(fits[c].score(features["val"], labels["val"])), float(fits[c].score(features["test"],
                                                                                      labels["test"])), c


def linear_probe(model_cfg: Any, data: DataBundle, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """test/probe_acc of the model with these weights on data (see the module's doc)."""
    net = build_model(model_cfg, data.meta)
    net.load_state_dict(weights)
    net.eval()
    splits = ("train", "val", "test")
    with torch.no_grad():
        features = {s: net.predict(getattr(data, s)[0].cpu()).float().flatten(1).numpy() for s in splits}
    labels = {s: getattr(data, s)[1].cpu().numpy() for s in splits}
    _, test, _ = probe_accuracy(features, labels)
    return {"test/probe_acc": test}
