"""The in-memory data path holds a data set once: loading, splitting and standardising a file peaks below 2x
the size of its features (it was 6x: float32 copies of float32 data, fancy-indexed splits, float64 statistics), and
the result is what the float64 computation gives."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dtrain.config import load_job, to_objects
from dtrain.data import load_data
from tests.helpers import JOBS


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(200_000, 64)) * rng.uniform(0.5, 4, size=64) + rng.uniform(-3, 3, size=64))
    path = tmp_path_factory.mktemp("mem") / "data.npz"
    np.savez(path, x=x.astype(np.float32), y=rng.integers(0, 10, len(x)))
    return path, x.astype(np.float32)


def _data(path, *over):
    return to_objects(load_job(JOBS / "mlp_digits.yaml", ["data.name=npz", f"data.path={path}", *over])).data


def test_loading_a_file_peaks_below_twice_its_features_and_keeps_them_once(npz):
    """The splits are views of one array ([train | val | test]): what the driver then copies into Ray's object store
    sits beside one copy of the data, not one and the held-out share (30 % in this job)."""
    path, x = npz
    tracemalloc.start()
    try:
        bundle = load_data(_data(path))
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2.0 * x.nbytes, f"peak {peak / x.nbytes:.2f}x the features"
    labels = len(x) * 8
    assert kept < 1.02 * x.nbytes + labels, f"kept {(kept - labels) / x.nbytes:.2f}x the features"
    assert sum(len(s[0]) for s in (bundle.train, bundle.val, bundle.test)) == len(x)


def test_splits_hold_every_sample_once_standardised_with_training_statistics(npz):
    path, x = npz
    bundle = load_data(_data(path))
    train = bundle.train[0].numpy().astype(np.float64)
    assert np.abs(train.mean(axis=0)).max() < 1e-4 and np.abs(train.std(axis=0) - 1).max() < 1e-4
    raw = load_data(_data(path, "data.standardize=false"))
    parts = [raw.train[0].numpy(), raw.val[0].numpy(), raw.test[0].numpy()]
    rows = np.concatenate(parts)
    assert np.array_equal(np.sort(rows[:, 0]), np.sort(x[:, 0]))  # a permutation of the file's samples
    mean, std = parts[0].astype(np.float64).mean(0), parts[0].astype(np.float64).std(0)
    for scaled, original in zip((bundle.val[0], bundle.test[0]), parts[1:], strict=True):
        np.testing.assert_allclose(scaled.numpy(), (original - mean) / std, rtol=1e-5, atol=1e-5)


def test_an_empty_validation_split_is_allowed(npz):
    path, x = npz
    bundle = load_data(_data(path, "data.val_fraction=0"))
    assert len(bundle.val[0]) == 0 and len(bundle.train[0]) + len(bundle.test[0]) == len(x)


@pytest.mark.parametrize("over", [[], ["data.standardize=false", "data.minmax=true"], ["data.val_fraction=0"]])
def test_shared_loading_gives_the_same_splits_in_one_shared_storage_handed_over_without_a_copy(npz, over):
    """What the local launcher's ranks read: the driver's one copy, in shared memory, bitwise the data that each rank
    would load for itself; pickled for a rank (torch.multiprocessing's pickler), it goes as a handle to that memory,
    where a plain tensor would first be copied into shared memory."""
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # noqa: F401 - registers the pickler's reductions for tensors

    path, x = npz
    own, shared = load_data(_data(path, *over)), load_data(_data(path, *over), shared=True)
    splits = [shared.train[0], shared.val[0], shared.test[0]]
    assert all(t.is_shared() for t in splits)
    assert len({t.untyped_storage().data_ptr() for t in splits}) == 1  # views of one tensor
    for mine, theirs in zip((own.train, own.val, own.test), (shared.train, shared.val, shared.test), strict=True):
        assert all(a.equal(b) for a, b in zip(mine, theirs, strict=True))
    for bundle, copied in ((shared, False), (own, True)):  # a plain tensor is first copied into shared memory
        where = bundle.train[0].data_ptr()
        assert len(ForkingPickler.dumps(bundle.train[0])) < 1000  # a handle
        assert (bundle.train[0].data_ptr() != where) == copied
