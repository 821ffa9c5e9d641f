"""Data sets by name and the file loaders (IDX, .npz, CSV) on small files the tests write, bad files included."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from dtrain.config import load_job, to_objects
from dtrain.data import DATASETS, load_arrays, load_data
from dtrain.data.files import read_idx
from dtrain.data.generated import ADDING_BASELINE_MSE, adding, periodic
from dtrain.data.series import persistence_mse, sunspots, windows
from dtrain.errors import ConfigError, DataError


def _data(name: str, path=None, **fields):
    """The data section of a job (validated like a real one)."""
    over = [f"data.name={name}"] + ([f"data.path={path}"] if path else [])
    over += [f"data.{k}={v}" for k, v in fields.items()]
    return to_objects(load_job(None, over, base={"model": {"name": "mlp"}})).data


def test_every_issue_data_set_is_registered():
    assert {"digits", "breast_cancer", "iris", "wine", "sunspots", "xor", "adding", "mnist", "npz", "csv"} <= set(
        DATASETS)


@pytest.mark.parametrize("name,n,features,classes", [("digits", 1797, 64, 10), ("breast_cancer", 569, 30, 2),
                                                      ("iris", 150, 4, 3), ("wine", 178, 13, 3)])
def test_bundled_sklearn_sets(name, n, features, classes):
    """Read from scikit-learn's files without importing it: the arrays its own loaders return, value for value."""
    import sklearn.datasets

    a = load_arrays(_data(name))
    assert a.x.shape == (n, features) and a.num_classes == classes and set(np.unique(a.y)) == set(range(classes))
    theirs = getattr(sklearn.datasets, f"load_{name}")()
    assert a.x.dtype == np.float32 and np.array_equal(a.x, theirs.data.astype(np.float32))
    assert a.y.dtype == np.int64 and np.array_equal(a.y, theirs.target)


def test_digits_as_images_for_the_cnn():
    bundle = load_data(_data("digits", options="{image: true}"))
    assert bundle.meta.input_shape == (1, 8, 8) and bundle.train[0].shape[1:] == (1, 8, 8)


def test_adding_problem_targets_are_the_sum_of_the_marked_values():
    a = adding(n_samples=500, seq_len=20, seed=3)
    assert a.x.shape == (500, 20, 2) and a.y.shape == (500, 1)
    assert np.all(a.x[:, :, 1].sum(axis=1) == 2)
    assert np.all(a.x[:, :10, 1].sum(axis=1) == 1)  # one marker in each half
    assert np.allclose((a.x[:, :, 0] * a.x[:, :, 1]).sum(axis=1), a.y[:, 0], atol=1e-6)
    assert np.mean((a.y - a.y.mean()) ** 2) == pytest.approx(ADDING_BASELINE_MSE, rel=0.15)
    assert np.array_equal(adding(50, 20, seed=3).x, adding(50, 20, seed=3).x)
    with pytest.raises(ConfigError, match="seq_len"):
        adding(seq_len=1)


def test_periodic_signals_have_the_frequency_of_their_class():
    a = periodic(n_samples=90, seq_len=64, noise=0.0)
    peak = np.abs(np.fft.rfft(a.x[:, :, 0], axis=1)).argmax(axis=1)
    assert np.array_equal(peak, a.y + 2)


def test_fourier_option_appends_the_spectrum_along_time():
    plain = load_data(_data("periodic", standardize=False))
    spec = load_data(_data("periodic", standardize=False, fourier=True))
    assert plain.meta.input_shape == (64, 1) and spec.meta.input_shape == (64 + 33,)
    x = plain.train[0][:, :, 0].numpy()
    assert np.allclose(spec.train[0][:, 64:].numpy(), np.abs(np.fft.rfft(x, axis=1, norm="ortho")), atol=1e-4)


def test_sunspots_windows_keep_time_order_and_persistence_baseline():
    a = sunspots(window=12)
    assert a.x.shape == (309 - 12, 12, 1) and a.y.shape == (297, 1) and a.period == 11 and not a.shuffle_split
    assert a.y[0, 0] == pytest.approx(a.x[1, -1, 0])  # the next window ends on this target
    bundle = load_data(_data("sunspots", standardize=False))
    assert bundle.test[1][0, 0] > 0 and len(bundle.test[0]) == round(297 * 0.2)
    assert np.allclose(bundle.test[0][0, -1, 0].item(), a.x[-len(bundle.test[0]), -1, 0])  # test = latest years
    x, y = windows(np.arange(10.0), 3)
    assert persistence_mse(x, y) == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="window"):
        windows(np.arange(5.0), 5)


def _write_idx(path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def _mnist_folder(folder, compress: bool, n_train: int = 20, n_test: int = 10):
    rng = np.random.default_rng(0)
    folder.mkdir()
    ext = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
                   compress=compress)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", (np.arange(n) % 10).astype(np.uint8),
                   compress=compress)
    return folder


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx_folder_keeps_its_split(tmp_path, compress):
    folder = _mnist_folder(tmp_path / "mnist", compress)
    bundle = load_data(_data("mnist", folder, standardize=False, val_fraction=0.25))
    assert bundle.meta.input_shape == (1, 28, 28) and bundle.meta.num_classes == 10
    assert len(bundle.train[0]) == 15 and len(bundle.val[0]) == 5 and len(bundle.test[0]) == 10
    assert float(bundle.train[0].max()) <= 1.0 and bundle.test[1].tolist() == list(range(10))


def test_read_idx_other_types(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 0.0]], dtype=">f4")
    _write_idx(tmp_path / "f.idx", values, code=0x0D)
    assert np.array_equal(read_idx(tmp_path / "f.idx"), values.astype(np.float32))


def test_bad_idx_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="IDX file not found"):
        read_idx(tmp_path / "missing")
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "junk")
    _write_idx(tmp_path / "short", np.zeros((4, 3), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-2])
    with pytest.raises(DataError, match=r"declares shape \(4, 3\)"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00" * 20)[:-6])
    with pytest.raises(DataError, match="corrupt gzip"):
        read_idx(tmp_path / "bad.gz")
    folder = _mnist_folder(tmp_path / "m", compress=False)
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_data(_data("mnist", folder))
    _write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(DataError, match="10 t10k images but 7 labels"):
        load_data(_data("mnist", folder))
    with pytest.raises(ConfigError, match="data.path: required"):
        load_data(_data("mnist"))


def test_npz_loader(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(50, 3)), y=np.arange(50) % 4)
    a = load_arrays(_data("npz", tmp_path / "c.npz"))
    assert a.task == "classification" and a.num_classes == 4 and a.x.dtype == np.float32
    np.savez(tmp_path / "r.npz", x=rng.normal(size=(50, 3)), y=rng.normal(size=50))
    assert load_arrays(_data("npz", tmp_path / "r.npz")).task == "regression"
    np.savez(tmp_path / "u.npz", x=rng.normal(size=(50, 3)))
    assert load_arrays(_data("npz", tmp_path / "u.npz")).task == "unsupervised"
    np.savez(tmp_path / "s.npz", x_train=rng.normal(size=(40, 2, 5)), y_train=np.arange(40) % 2,
             x_test=rng.normal(size=(10, 2, 5)), y_test=np.arange(10) % 2)
    bundle = load_data(_data("npz", tmp_path / "s.npz", val_fraction=0.0))
    assert len(bundle.train[0]) == 40 and len(bundle.test[0]) == 10 and bundle.meta.input_shape == (2, 5)


def test_bad_npz_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match=".npz file not found"):
        load_arrays(_data("npz", tmp_path / "nope.npz"))
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz"):
        load_arrays(_data("npz", tmp_path / "text.npz"))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="single .npy array"):
        load_arrays(_data("npz", tmp_path / "single.npy"))
    np.savez(tmp_path / "keys.npz", features=np.zeros((3, 2)))
    with pytest.raises(DataError, match="no array named 'x' \\(found: features\\)"):
        load_arrays(_data("npz", tmp_path / "keys.npz"))
    np.savez(tmp_path / "len.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match="5 samples but 4 targets"):
        load_arrays(_data("npz", tmp_path / "len.npz"))
    np.savez(tmp_path / "nan.npz", x=np.array([[1.0, np.nan]]), y=np.zeros(1))
    with pytest.raises(DataError, match="NaN"):
        load_arrays(_data("npz", tmp_path / "nan.npz"))
    np.savez(tmp_path / "neg.npz", x=np.zeros((2, 2)), y=np.array([-1, 1]))
    with pytest.raises(DataError, match="integers 0..K-1"):
        load_arrays(_data("npz", tmp_path / "neg.npz", options="{task: classification}"))


def test_csv_loader(tmp_path):
    (tmp_path / "h.csv").write_text("a,b,label\n1,2,0\n3,4,1\n5,6,1\n\n")
    a = load_arrays(_data("csv", tmp_path / "h.csv"))
    assert a.x.tolist() == [[1, 2], [3, 4], [5, 6]] and a.y.tolist() == [0, 1, 1] and a.task == "classification"
    a = load_arrays(_data("csv", tmp_path / "h.csv", options="{target: a, task: regression}"))
    assert a.x.tolist() == [[2, 0], [4, 1], [6, 1]] and a.y[:, 0].tolist() == [1, 3, 5]
    (tmp_path / "n.csv").write_text("0.5;1\n1.5;0\n")
    a = load_arrays(_data("csv", tmp_path / "n.csv", options="{delimiter: ';', target: null}"))
    assert a.x.shape == (2, 2) and a.y is None and a.task == "unsupervised"


def test_bad_csv_files_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="CSV file not found"):
        load_arrays(_data("csv", tmp_path / "none.csv"))
    cases = {"empty.csv": ("", "empty CSV"), "ragged.csv": ("a,b\n1,2\n3\n", "line 3 has 1 columns, expected 2"),
             "text.csv": ("1,2\n3,x\n", "line 2: 'x' is not a number"), "header.csv": ("a,b\n", "no data rows")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_arrays(_data("csv", tmp_path / name))
    (tmp_path / "ok.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataError, match="no column named 'c'"):
        load_arrays(_data("csv", tmp_path / "ok.csv", options="{target: c}"))
    with pytest.raises(ConfigError, match="data.options.sep: unknown option"):
        load_arrays(_data("csv", tmp_path / "ok.csv", options="{sep: ';'}"))
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not a readable text CSV"):
        load_arrays(_data("csv", tmp_path / "bin.csv"))
