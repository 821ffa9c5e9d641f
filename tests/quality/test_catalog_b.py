"""The energy-based and unsupervised models beyond their catalog figures (test_catalog.py): the SOM's batch
update across workers, and a staged DBN under DeepSpeed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from minisom import MiniSom
from omegaconf import OmegaConf

from dtrain.config import build_job, to_dict, to_objects
from dtrain.data import load_data
from dtrain.launch.spawn import latest_checkpoint, spawn_workers
from dtrain.models import build_model

pytestmark = pytest.mark.slow
MINMAX = {"standardize": False, "minmax": True}


def _train(tmp_path, model: dict, *, world: int, epochs: int, data: dict | None = None, optim: dict | None = None,
           save_every: int | None = None):
    """Train through spawned workers; returns (model with the final checkpoint's weights, data bundle, summary)."""
    job = to_dict(build_job(OmegaConf.create({
        "name": "q", "model": model, "data": {"name": "digits", "batch_size": 32 // world, **(data or {})},
        "optim": {"name": "adam", **(optim or {})},
        "trainer": {"num_workers": world, "max_epochs": epochs, "log_every_n_steps": 1000},
        "checkpoint": {"every_n_epochs": save_every or epochs},
        "logging": {"progress": False, "wandb": {"enabled": "false"}}})))
    summary = spawn_workers(job, tmp_path, world=world)
    cfg = to_objects(job)
    bundle = load_data(cfg.data)  # the very split and scaling the workers trained on
    net = build_model(cfg.model, bundle.meta)
    net.load_state_dict(torch.load(latest_checkpoint(tmp_path) / "model.pt", weights_only=True)["model"])
    return net.eval(), bundle, summary


def _som_vs_minisom(tmp_path, world: int, seed: int) -> tuple[float, float, float, float]:
    """(our QE, our TE, MiniSom's QE, MiniSom's TE) on the test split of data seed `seed`."""
    epochs, steps = 10, 10 * 41  # 41 steps of a global batch of 32 per epoch
    model = {"name": "som", "rows": 8, "cols": 8, "sigma": 2.0, "decay_steps": steps}
    net, bundle, summary = _train(tmp_path / f"w{world}s{seed}", model, world=world, epochs=epochs,
                                  data={"seed": seed}, optim={"name": "sgd", "lr": 1.0, "momentum": 0.0})
    assert summary["steps"] == steps
    train, test = bundle.train[0].numpy().astype(np.float64), bundle.test[0].numpy().astype(np.float64)
    mini = MiniSom(8, 8, train.shape[1], sigma=2.0, learning_rate=0.5, random_seed=0)
    mini.random_weights_init(train)
    mini.train_random(train, epochs * len(train))  # the same number of sample presentations
    ours = MiniSom(8, 8, train.shape[1])
    ours._weights = net.weight.detach().double().numpy().reshape(8, 8, -1)
    qe, te = ours.quantization_error(test), ours.topographic_error(test)
    assert summary["test"]["test/quant_error"] == pytest.approx(qe, rel=1e-4)
    return qe, te, mini.quantization_error(test), mini.topographic_error(test)


def test_two_workers_train_the_same_som_as_one(tmp_path):
    """The SOM's batch update is the models' one collective: 2 workers reach the map 1 worker reaches, and the
    engine's test quantization error is MiniSom's on that map."""
    one, two = _som_vs_minisom(tmp_path, 1, 0), _som_vs_minisom(tmp_path, 2, 0)
    print(f"som: QE/TE 1 worker {one[:2]}, 2 workers {two[:2]}")
    assert two[:2] == pytest.approx(one[:2], rel=1e-4)


def test_staged_dbn_under_deepspeed_matches_ddp(tmp_path):
    """DeepSpeed re-initialises itself for every stage; its run must follow the DDP run of the same job."""
    model = {"name": "dbn", "hidden": [32, 16], "pretrain_epochs": 1, "pretrain_lr": 0.05, "finetune_epochs": 3}
    job = {"name": "ds", "model": model, "data": {"name": "digits", "batch_size": 16, **MINMAX},
           "optim": {"lr": 0.01}, "trainer": {"num_workers": 2, "max_epochs": 3, "log_every_n_steps": 1000},
           "checkpoint": {"every_n_epochs": 3}, "logging": {"progress": False, "wandb": {"enabled": "false"}}}
    runs = {}
    for strategy in ("ddp", "deepspeed"):
        trainer = {**job["trainer"], "strategy": strategy, "deepspeed": {"zero_stage": 1}}
        runs[strategy] = spawn_workers(to_dict(build_job(OmegaConf.create({**job, "trainer": trainer}))),
                                       tmp_path / strategy, world=2)
    ddp, ds = runs["ddp"], runs["deepspeed"]
    assert ds["stages"] == ddp["stages"] == 3 and ds["steps"] == ddp["steps"]
    # Same seeds per rank, so the same Gibbs samples: the runs differ only by floating-point summation order.
    assert ds["test"]["test/loss"] == pytest.approx(ddp["test"]["test/loss"], abs=2e-3)
    assert ds["test"]["test/acc"] > 0.5
