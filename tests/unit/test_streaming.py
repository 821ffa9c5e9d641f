"""The streaming Loader's arithmetic, on a stream the test makes (no Ray): equal steps on every rank, each row
once per epoch, global-batch weights, seeded per-epoch order independent of how the stream is batched, and a resume
that continues at the right sample; the seeded split and the one-pass statistics of dtrain.data.stream_batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtrain.data.base import BatchPlan
from dtrain.data.stream_batches import combine_moments, split_moments, split_of
from dtrain.data.streaming import StreamEval, StreamLoader
from dtrain.errors import DataError

CPU = torch.device("cpu")


def _stream(rows: np.ndarray, chunk: int):
    """One epoch of a rank's share: rows (ids in column 0) in batches of `chunk`, as Ray Data would hand them."""
    def epoch():
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            yield {"x": part.astype(np.float32), "y": part[:, 0].astype(np.int64)}
    return epoch


def _shares(n: int, world: int) -> list[np.ndarray]:
    ids = np.arange(n).reshape(-1, 1).repeat(3, axis=1)
    per = n // world  # Ray Data's equal split: the same rows on every rank, the remainder left out
    return [ids[r * per:(r + 1) * per] for r in range(world)]


def _ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b.tensors[1]]


@pytest.mark.parametrize("world,accum", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_every_rank_takes_the_same_steps_and_each_row_is_seen_once(world, accum):
    n, batch = 203, 8
    plan = BatchPlan(batch * world * accum, accum, world)
    loaders = [StreamLoader(_stream(share, 7), n, plan, r, CPU, seed=1, buffer=50)
               for r, share in enumerate(_shares(n, world))]
    per_rank = [list(loader.iter_from(0)) for loader in loaders]
    steps = [sum(b.last for b in batches) for batches in per_rank]
    assert steps == [loaders[0].steps_per_epoch()] * world == [-(-(n // world) // (batch * accum))] * world
    assert len({len(b) for b in per_rank}) == 1  # the same micro-batches on every rank: no collective waits
    seen = sorted(i for batches in per_rank for i in _ids(batches))
    assert seen == list(range(world * (n // world)))
    for micro in zip(*per_rank, strict=True):  # each step's weights sum to the world size: the global mean
        assert len({m.step_samples for m in micro}) == 1 and len({m.last for m in micro}) == 1
    step_rows = 0
    for b in per_rank[0]:
        step_rows += b.real
        if b.last:
            assert b.step_samples == step_rows * world
            step_rows = 0


def test_the_order_is_seeded_per_epoch_and_does_not_depend_on_the_stream_batching():
    n, plan = 300, BatchPlan(16, 1, 1)
    rows = _shares(n, 1)[0]

    def order(epoch: int, chunk: int, seed: int = 0) -> list[int]:
        loader = StreamLoader(_stream(rows, chunk), n, plan, 0, CPU, seed=seed, buffer=64)
        loader.set_epoch(epoch)
        return _ids(loader.iter_from(0))

    assert order(0, 7) == order(0, 100) == order(0, 1)
    assert order(0, 7) != order(1, 7) and order(0, 7) != order(0, 7, seed=5)
    assert sorted(order(3, 9)) == list(range(n)) and order(3, 9) != list(range(n))


@pytest.mark.parametrize("world,accum,steps_done", [(1, 1, 5), (2, 1, 3), (2, 2, 4), (2, 2, 0)])
def test_a_resume_mid_epoch_continues_at_the_next_sample(world, accum, steps_done):
    """What a resume after `steps_done` optimizer steps streams is exactly the rest of the uninterrupted epoch."""
    n, batch = 250, 6
    plan = BatchPlan(batch * world * accum, accum, world)
    for rank, share in enumerate(_shares(n, world)):
        def loader():
            ld = StreamLoader(_stream(share, 11), n, plan, rank, CPU, seed=3, buffer=40)
            ld.set_epoch(2)
            return ld

        full = list(loader().iter_from(0))
        ends = [i + 1 for i, b in enumerate(full) if b.last]
        cut = ends[steps_done - 1] if steps_done else 0
        resumed = list(loader().iter_from(steps_done * plan.global_batch))
        assert len(resumed) == len(full) - cut
        for a, b in zip(resumed, full[cut:], strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors, b.tensors, strict=True))
            assert (a.real, a.step_samples, a.last) == (b.real, b.step_samples, b.last)


def test_a_stream_shorter_than_counted_is_a_data_error():
    plan = BatchPlan(8, 1, 1)
    loader = StreamLoader(_stream(_shares(40, 1)[0], 8), 50, plan, 0, CPU)
    with pytest.raises(DataError, match="fewer rows than the driver counted"):
        list(loader.iter_from(0))


def test_evaluation_shares_are_equal_and_count_every_streamed_row():
    n, world = 101, 2
    evals = [StreamEval(_stream(share, 13), n, 8, r, world, CPU) for r, share in enumerate(_shares(n, world))]
    batches = [list(e) for e in evals]
    assert len(batches[0]) == len(batches[1]) and len(evals[0]) == 100
    assert sorted(_ids(batches[0]) + _ids(batches[1])) == list(range(100))


def test_the_seeded_split_is_a_stable_function_of_the_row():
    rng = np.random.default_rng(0)
    batch = {"a": rng.normal(size=20_000), "b": rng.integers(0, 9, 20_000)}
    split = split_of(batch, ["a", "b"], 7, 0.1, 0.2)
    assert np.array_equal(split, split_of(batch, ["a", "b"], 7, 0.1, 0.2))
    half = {k: v[10_000:] for k, v in batch.items()}  # how rows are batched does not matter
    assert np.array_equal(split[10_000:], split_of(half, ["a", "b"], 7, 0.1, 0.2))
    shares = np.bincount(split, minlength=3) / len(split)
    assert abs(shares[2] - 0.2) < 0.01 and abs(shares[1] - 0.08) < 0.01
    assert not np.array_equal(split, split_of(batch, ["a", "b"], 8, 0.1, 0.2))


def test_partial_moments_combine_to_the_training_rows_mean_and_std():
    rng = np.random.default_rng(1)
    batch = {"a": rng.normal(3, 2, 5000), "b": rng.uniform(0, 10, 5000), "label": rng.integers(0, 3, 5000)}
    kw = {"columns": ["a", "b", "label"], "features": ["a", "b"], "seed": 0, "val_fraction": 0.1,
          "test_fraction": 0.2}
    parts = [{k: v[0] for k, v in split_moments({c: x[s:s + 700] for c, x in batch.items()}, **kw).items()}
             for s in range(0, 5000, 700)]
    counts, mean, std = combine_moments(parts)
    train = split_of(batch, kw["columns"], 0, 0.1, 0.2) == 0
    x = np.stack([batch["a"][train], batch["b"][train]], axis=1)
    assert counts.sum() == 5000 and counts[0] == train.sum()
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, x.std(0), rtol=1e-10)


def test_ray_datas_workers_import_the_row_transforms_without_torch():
    """Each Ray Data worker process imports dtrain.data.stream_batches to run the stream's per-batch transforms:
    that must not drag in torch (seconds and hundreds of MB per worker); dtrain.data's catalog still answers by name."""
    import subprocess
    import sys

    code = ("import sys, dtrain.data.stream_batches; assert 'torch' not in sys.modules, 'torch imported'; "
            "from dtrain.data import load_data, DATASETS; assert 'digits' in DATASETS and callable(load_data)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
