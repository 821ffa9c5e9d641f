"""Quality of the supervised catalog (perceptron, mlp, cnn, rnn, lstm), each trained from its shipped job file
through the real engine and compared with a peer on the very same split: scikit-learn's Perceptron and
MLPClassifier, the 0.167 baseline of the adding problem, and the persistence forecast of the sunspot series.

The job files run 2 DDP workers; here one worker takes the same global batch (the sharded loader makes the two
equivalent, tested in tests/distributed), trained in this process to keep the suite fast. Shortened runs then
show the same job files under DeepSpeed (2 spawned workers) and through Ray Train.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dtrain.config import load_job, to_dict, to_objects
from dtrain.data import load_data
from dtrain.data.generated import ADDING_BASELINE_MSE
from dtrain.data.series import persistence_mse
from dtrain.launch.spawn import LocalPublisher, latest_checkpoint, spawn_workers
from dtrain.launch.worker import run_worker
from tests.helpers import JOBS

pytestmark = pytest.mark.slow


def _one_worker(job_file: str, tmp_path, *overrides: str):
    """The job as one worker with the job's global batch; returns the resolved job."""
    job = load_job(JOBS / job_file, [f"runs_dir={tmp_path}", "name=q", "logging.progress=false",
                                     "logging.wandb.enabled=false", "checkpoint.every_n_epochs=0", *overrides])
    job.data.batch_size = job.data.batch_size * (job.trainer.num_workers or 2)
    job.trainer.num_workers = 1
    return job


def _train(job, tmp_path) -> dict:
    """Run the engine (fit loop, DDP strategy, sharded loader) in this process; returns the summary."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what spawned workers use: deterministic and fastest for models this small
    try:
        return run_worker(to_dict(job), tmp_path, LocalPublisher(tmp_path), torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


def _split(job) -> tuple[np.ndarray, ...]:
    """The train and test arrays (flattened, standardised) that the engine trained and tested on."""
    bundle = load_data(to_objects(job).data)
    flat = [t.numpy().reshape(len(t), -1) if t.dim() > 1 else t.numpy() for t in (*bundle.train, *bundle.test)]
    return tuple(flat)


def test_perceptron_beats_sklearn_perceptron_on_breast_cancer(tmp_path):
    from sklearn.linear_model import Perceptron

    job = _one_worker("perceptron_breast_cancer.yaml", tmp_path)
    acc = _train(job, tmp_path)["test"]["test/acc"]
    x, y, x_test, y_test = _split(job)
    peer = Perceptron(random_state=0).fit(x, y).score(x_test, y_test)
    print(f"perceptron breast_cancer: test acc {acc:.4f} vs sklearn Perceptron {peer:.4f}")
    assert acc >= peer and acc >= 0.94


def test_perceptron_cannot_fit_xor_but_mlp_can(tmp_path):
    linear = _train(_one_worker("perceptron_xor.yaml", tmp_path / "p"), tmp_path / "p")
    mlp = _train(_one_worker("mlp_xor.yaml", tmp_path / "m"), tmp_path / "m")
    print(f"xor: perceptron train/test acc {linear['final']['train/acc']:.3f}/{linear['test']['test/acc']:.3f}, "
          f"mlp {mlp['final']['train/acc']:.3f}/{mlp['test']['test/acc']:.3f}")
    assert linear["test"]["test/acc"] <= 0.75 and linear["final"]["train/acc"] <= 0.75
    assert mlp["test"]["test/acc"] == 1.0


def test_mlp_matches_sklearn_mlp_on_digits(tmp_path):
    from sklearn.neural_network import MLPClassifier

    job = _one_worker("mlp_digits_long.yaml", tmp_path)
    acc = _train(job, tmp_path)["test"]["test/acc"]
    x, y, x_test, y_test = _split(job)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's convergence warning at its default 200 iterations
        peer = MLPClassifier(random_state=0).fit(x, y).score(x_test, y_test)
    print(f"mlp digits: test acc {acc:.4f} vs sklearn MLPClassifier {peer:.4f}")
    assert acc >= peer


def test_cnn_reaches_0985_on_digits(tmp_path):
    summary = _train(_one_worker("cnn_digits.yaml", tmp_path), tmp_path)
    print(f"cnn digits: test acc {summary['test']['test/acc']:.4f}")
    assert summary["test"]["test/acc"] >= 0.985


def _input_gradient_ratio(model: torch.nn.Module, x: torch.Tensor) -> float:
    """|d output / d first input| over |d output / d last input|: how much of the start of a sequence reaches
    the output through backpropagation (near 0: vanished)."""
    x = x.clone().requires_grad_(True)
    model.predict(x).sum().backward()
    per_step = x.grad.abs().sum(dim=(0, 2))
    return float(per_step[0] / per_step[-1])


def test_lstm_solves_adding_problem_where_rnn_stays_at_baseline(tmp_path):
    from dtrain.models import build_model

    mse, ratio = {}, {}
    for cell in ("rnn", "lstm"):
        job = _one_worker(f"{cell}_adding.yaml", tmp_path / cell)
        job.checkpoint.every_n_epochs = job.trainer.max_epochs  # keep the final weights
        mse[cell] = _train(job, tmp_path / cell)["test"]["test/mse"]
        cfg = to_objects(job)
        bundle = load_data(cfg.data)
        model = build_model(cfg.model, bundle.meta)
        model.load_state_dict(torch.load(latest_checkpoint(tmp_path / cell) / "model.pt", weights_only=True)["model"])
        ratio[cell] = _input_gradient_ratio(model, bundle.test[0][:500])
    print(f"adding (length 50): test mse rnn {mse['rnn']:.4f}, lstm {mse['lstm']:.4f} (baseline "
          f"{ADDING_BASELINE_MSE:.4f}); trained gradient first/last step: rnn {ratio['rnn']:.1e}, "
          f"lstm {ratio['lstm']:.1e}")
    assert mse["lstm"] < 0.1 * ADDING_BASELINE_MSE  # solved
    assert mse["rnn"] > 0.85 * ADDING_BASELINE_MSE  # still at the predict-the-mean baseline
    assert ratio["rnn"] < 1e-3 < ratio["lstm"]  # why: the RNN's gradient vanishes over the 50 steps


@pytest.mark.parametrize("cell", ["lstm", "rnn"])
def test_sunspot_forecast_beats_persistence(cell, tmp_path):
    job = _one_worker(f"{cell}_sunspots.yaml", tmp_path)
    mse = _train(job, tmp_path)["test"]["test/mse"]
    bundle = load_data(to_objects(job).data)  # unstandardised windows: the last input is last year's value
    baseline = persistence_mse(bundle.test[0].numpy(), bundle.test[1].numpy())
    print(f"{cell} sunspots: test mse {mse:.4f} vs persistence {baseline:.4f}")
    assert mse < 0.6 * baseline


def test_fourier_features_solve_the_periodic_task(tmp_path):
    """Phase-shifted sines: a linear model on raw samples is near chance, on the FFT magnitude it is near perfect."""
    accs = {}
    for fourier in (False, True):
        job = _one_worker("perceptron_breast_cancer.yaml", tmp_path / str(fourier), "data.name=periodic",
                          f"data.fourier={fourier}", "optim.name=adam", "optim.lr=0.01", "trainer.max_epochs=15")
        accs[fourier] = _train(job, tmp_path / str(fourier))["test"]["test/acc"]
    print(f"periodic (3 frequencies, random phase): perceptron acc raw {accs[False]:.3f}, fourier {accs[True]:.3f}")
    assert accs[False] < 0.6 and accs[True] > 0.95


@pytest.mark.parametrize("descent,epochs,steps_per_epoch,lr", [("batch", 60, 1, 0.2), ("stochastic", 2, 97, 0.01),
                                                               ("minibatch", 10, 7, 0.05)])
def test_gradient_descent_variants_train_a_perceptron_on_iris(descent, epochs, steps_per_epoch, lr, tmp_path):
    """batch: the whole training set per step; stochastic: one sample per step; minibatch: data.batch_size."""
    job = _one_worker("perceptron_breast_cancer.yaml", tmp_path, "data.name=iris", f"optim.descent={descent}",
                      f"trainer.max_epochs={epochs}", f"optim.lr={lr}", "data.test_fraction=0.2")
    summary = _train(job, tmp_path)  # iris: 150 samples -> 120 for training and validation -> 108 + 12
    n_train = len(load_data(to_objects(job).data).train[0])
    assert n_train == 108 and summary["steps"] == epochs * (n_train if descent == "stochastic" else steps_per_epoch)
    assert summary["test"]["test/acc"] >= 0.8


@pytest.mark.parametrize("job_file", ["cnn_digits.yaml", "lstm_sunspots.yaml"])
def test_catalog_models_train_under_deepspeed(job_file, tmp_path):
    """The same job files under DeepSpeed ZeRO-1 with 2 spawned gloo workers (shortened)."""
    short = {"cnn_digits.yaml": ["trainer.max_epochs=3", "model.channels=[8,16]", "model.hidden=[32]",
                                 "model.dropout=0", "optim.scheduler=none", "optim.lr=0.005"],
             "lstm_sunspots.yaml": ["trainer.max_epochs=20"]}[job_file]
    job = load_job(JOBS / job_file, [f"runs_dir={tmp_path}", "name=ds", "logging.progress=false",
                                     "logging.wandb.enabled=false", "checkpoint.every_n_epochs=0",
                                     "trainer.strategy=deepspeed", "trainer.deepspeed.zero_stage=1", *short])
    test = spawn_workers(to_dict(job), tmp_path, world=2)["test"]
    if "test/acc" in test:
        assert test["test/acc"] > 0.85  # chance is 0.1
    else:
        bundle = load_data(to_objects(job).data)
        assert test["test/mse"] < 0.6 * persistence_mse(bundle.test[0].numpy(), bundle.test[1].numpy())


