"""Quality of the energy-based and unsupervised catalog models, trained through the real engine (spawned gloo
workers), against established peers on the same split: PCA, scikit-learn's BernoulliRBM pipeline, MiniSom."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from minisom import MiniSom
from omegaconf import OmegaConf
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import BernoulliRBM

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


def _pca_mse(bundle, code: int) -> float:
    train, test = bundle.train[0].numpy(), bundle.test[0].numpy()
    pca = PCA(code, random_state=0).fit(train)
    return float(((pca.inverse_transform(pca.transform(test)) - test) ** 2).mean())


def test_autoencoder_reconstructs_digits_better_than_pca(tmp_path):
    net, bundle, summary = _train(tmp_path, {"name": "autoencoder", "hidden": [64], "code": 8}, world=1, epochs=12,
                                  optim={"lr": 0.003, "scheduler": "cosine"})
    with torch.no_grad():
        mse = float(((net.predict(bundle.test[0]) - bundle.test[0]) ** 2).mean())
    assert summary["test"]["test/mse"] == pytest.approx(mse, rel=1e-4)  # the engine's metric is this checkpoint's
    pca = _pca_mse(bundle, 8)
    print(f"autoencoder code 8: test mse {mse:.4f} vs PCA(8) {pca:.4f}")
    assert mse < 0.9 * pca


def test_deep_autoencoder_with_rbm_pretraining_reconstructs_better_than_pca(tmp_path):
    model = {"name": "deep_autoencoder", "layers": [128, 64, 4], "pretrain": True, "pretrain_epochs": 4,
             "pretrain_lr": 0.03, "finetune_epochs": 15, "finetune_lr": 0.01}
    net, bundle, summary = _train(tmp_path, model, world=1, epochs=15, data=MINMAX, optim={"scheduler": "cosine"})
    assert summary["stages"] == 4  # rbm0, rbm1, rbm2, finetune
    with torch.no_grad():
        mse = float(((net.predict(bundle.test[0]) - bundle.test[0]) ** 2).mean())
    pca = _pca_mse(bundle, 4)
    print(f"deep autoencoder code 4 (RBM pre-trained): test mse {mse:.4f} vs PCA(4) {pca:.4f}")
    assert mse < pca


def _logreg_acc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    return float(LogisticRegression(C=10.0, max_iter=1000).fit(train_x, train_y).score(test_x, test_y))


def test_rbm_features_classify_at_least_as_well_as_sklearn_bernoulli_rbm_pipeline(tmp_path):
    net, bundle, summary = _train(tmp_path, {"name": "rbm", "hidden": 128}, world=2, epochs=10, data=MINMAX,
                                  optim={"lr": 0.01})
    assert summary["world_size"] == 2 and summary["test"]["test/recon_error"] < 2.0
    (train_x, train_y), (test_x, test_y) = (t.numpy() for t in bundle.train), (t.numpy() for t in bundle.test)
    with torch.no_grad():
        ours = _logreg_acc(net.predict(bundle.train[0]).numpy(), train_y, net.predict(bundle.test[0]).numpy(), test_y)
    # scikit-learn's defaults (persistent CD, lr 0.1, batches of 10) with our width and number of epochs.
    sk = BernoulliRBM(n_components=128, n_iter=10, random_state=0).fit(train_x)
    theirs = _logreg_acc(sk.transform(train_x), train_y, sk.transform(test_x), test_y)
    print(f"rbm features + logistic regression: {ours:.4f} vs sklearn BernoulliRBM pipeline {theirs:.4f}")
    assert ours >= theirs


def test_dbn_pretrained_then_finetuned_by_two_workers_reaches_97_percent_on_digits(tmp_path):
    model = {"name": "dbn", "hidden": [128, 64], "pretrain_epochs": 4, "pretrain_lr": 0.05, "finetune_epochs": 15,
             "finetune_lr": 0.01}
    _, _, summary = _train(tmp_path, model, world=2, epochs=15, data=MINMAX, optim={"scheduler": "cosine"})
    assert summary["stages"] == 3
    print(f"dbn test accuracy {summary['test']['test/acc']:.4f}")
    assert summary["test"]["test/acc"] >= 0.97


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


def test_som_quantization_and_topographic_error_match_minisom(tmp_path):
    """Averaged over three data splits (a single split moves either by about 1 %); two workers train the same map
    as one."""
    runs = np.array([_som_vs_minisom(tmp_path, 1, seed) for seed in range(3)])
    qe, te, qe_peer, te_peer = runs.mean(axis=0)
    print(f"som: QE {qe:.4f} TE {te:.4f} vs MiniSom QE {qe_peer:.4f} TE {te_peer:.4f} (3 splits)")
    assert qe <= 1.01 * qe_peer and te <= te_peer + 0.01
    assert _som_vs_minisom(tmp_path, 2, 0)[:2] == pytest.approx(tuple(runs[0][:2]), rel=1e-4)


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
