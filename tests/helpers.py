"""Helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def small_job(**over) -> dict:
    """A quick job as a plain dict (mlp on digits), with dotted-key overrides."""
    from omegaconf import OmegaConf

    from dtrain.config import build_job, to_dict

    base = OmegaConf.create({
        "name": "t", "model": {"name": "mlp", "hidden": [32]},
        "data": {"name": "digits", "batch_size": 32},
        "trainer": {"max_epochs": 2, "num_workers": 2, "log_every_n_steps": 5},
        "logging": {"wandb": {"enabled": "false"}},
    })
    merged = OmegaConf.merge(base, OmegaConf.from_dotlist([f"{k}={v}" for k, v in over.items()]))
    return to_dict(build_job(merged))


def parquet_train_rows(folder, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2) -> int:
    """The training rows of digits written as Parquet by `dtrain data convert`: its seeded split, from the rows."""
    import numpy as np
    import pyarrow.parquet as pq

    from dtrain.data.stream_batches import split_of

    table = pq.read_table(folder).to_pydict()
    cols = [f"f{j}" for j in range(64)] + ["label"]
    split = split_of({c: np.asarray(table[c]) for c in cols}, cols, seed, val_fraction, test_fraction)
    return int((split == 0).sum())
