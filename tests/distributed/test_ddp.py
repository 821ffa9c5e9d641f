"""The DDP engine on CPU with gloo: equivalence to one worker, clipping, accumulation, mixed precision."""

import torch

from dtrain.config import to_objects
from dtrain.data import load_data
from dtrain.engine.checkpoint import safe_load
from dtrain.launch.spawn import latest_checkpoint, spawn_workers
from dtrain.models import build_model
from tests.helpers import small_job


def _final_weights(run_dir):
    return safe_load(latest_checkpoint(run_dir) / "model.pt")["model"]


def _assert_close(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def test_two_workers_equal_one_worker_at_same_global_batch(tmp_path):
    common = {"trainer.max_epochs": 2, "optim.name": "sgd", "optim.lr": 0.05}
    two = spawn_workers(small_job(**common, **{"data.batch_size": 16}), tmp_path / "two", world=2)
    one = spawn_workers(small_job(**common, **{"data.batch_size": 32}), tmp_path / "one", world=1)
    assert two["steps"] == one["steps"] == 2 * 41  # ceil(1294 train samples / 32 per global batch), 2 epochs
    _assert_close(_final_weights(tmp_path / "two"), _final_weights(tmp_path / "one"), atol=1e-5)
    assert abs(two["test"]["test/loss"] - one["test"]["test/loss"]) < 1e-4


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    # Two accumulated micro-batches of 16 are exactly the samples of one batch of 32 (same permutation), including
    # the epoch's short last window, so the weights must match, not just the loss.
    common = {"trainer.max_epochs": 1, "optim.name": "sgd", "optim.lr": 0.05}
    accum = spawn_workers(small_job(**common, **{"data.batch_size": 16, "trainer.grad_accum": 2}),
                          tmp_path / "accum", world=1)
    large = spawn_workers(small_job(**common, **{"data.batch_size": 32}), tmp_path / "large", world=1)
    assert accum["steps"] == large["steps"] == 41
    _assert_close(_final_weights(tmp_path / "accum"), _final_weights(tmp_path / "large"), atol=1e-5)


def _initial_weights(job):
    obj = to_objects(job)
    torch.manual_seed(obj.trainer.seed)
    return build_model(obj.model, load_data(obj.data).meta).state_dict()


def test_clipping_by_norm_bounds_the_update(tmp_path):
    job = small_job(**{"optim.name": "sgd", "optim.lr": 1.0, "optim.momentum": 0.0, "trainer.max_steps": 1,
                       "trainer.grad_clip": 0.01, "trainer.log_every_n_steps": 1})
    spawn_workers(job, tmp_path, world=2)
    before, after = _initial_weights(job), _final_weights(tmp_path)
    update = torch.cat([(after[k] - before[k]).flatten() for k in before])
    logged = [r for r in _records(tmp_path) if r.get("event") == "step"][0]
    assert logged["train/grad_norm"] > 0.01 * 10  # the raw gradient was far above the threshold...
    assert update.norm() <= 0.01 * 1.0001  # ...and the applied step was clipped to it


def test_clipping_by_value_bounds_each_element(tmp_path):
    job = small_job(**{"optim.name": "sgd", "optim.lr": 1.0, "optim.momentum": 0.0, "trainer.max_steps": 1,
                       "trainer.grad_clip": 0.001, "trainer.grad_clip_mode": "value"})
    spawn_workers(job, tmp_path, world=2)
    before, after = _initial_weights(job), _final_weights(tmp_path)
    update = torch.cat([(after[k] - before[k]).flatten() for k in before])
    assert update.abs().max() <= 0.001 * 1.0001
    assert update.abs().max() >= 0.001 * 0.9999  # some gradient element was actually clipped


def test_bf16_mixed_precision_trains(tmp_path):
    summary = spawn_workers(small_job(**{"trainer.precision": "bf16-mixed", "optim.lr": 0.01}), tmp_path)
    assert summary["test"]["test/acc"] > 0.9


def test_fp16_mixed_precision_with_grad_scaler_trains(tmp_path):
    summary = spawn_workers(small_job(**{"trainer.precision": "fp16-mixed", "optim.lr": 0.01}), tmp_path)
    assert summary["test"]["test/acc"] > 0.9


def _records(run_dir):
    from dtrain.tracking import read_metrics

    return read_metrics(run_dir)


def test_ranks_handed_the_drivers_shared_data_train_on_it_as_on_their_own_load(tmp_path):
    """`dtrain train` on local processes loads the data once, in shared memory, and hands it to the ranks: the run is
    bitwise the one whose ranks load the data themselves; a bundle cut to 512 training rows shows in the step count
    that the ranks trained on what they were handed."""
    import dataclasses

    job = small_job(**{"data.batch_size": 16})
    shared = load_data(to_objects(job).data, shared=True)
    handed = spawn_workers(job, tmp_path / "handed", world=2, data=shared)
    loaded = spawn_workers(job, tmp_path / "loaded", world=2)
    assert handed["test"] == loaded["test"] and handed["steps"] == loaded["steps"]
    cut = dataclasses.replace(shared, train=tuple(t[:512] for t in shared.train))
    assert spawn_workers(job, tmp_path / "cut", world=2, data=cut)["steps"] == 2 * 512 // 32 < loaded["steps"]
