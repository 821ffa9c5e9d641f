"""What the supervised catalog's options do (the catalog's own figures: test_catalog.py): Fourier features,
the gradient-descent variants, and the same job files under DeepSpeed.

Here one worker takes the job's global batch (the sharded loader makes the two equivalent, tested in
tests/distributed), trained in this process to keep the suite fast; the DeepSpeed runs use 2 spawned workers.
"""

from __future__ import annotations

import pytest
import torch

from dtrain.config import load_job, to_dict, to_objects
from dtrain.data import load_data
from dtrain.data.series import persistence_mse
from dtrain.launch.spawn import LocalPublisher, spawn_workers
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


