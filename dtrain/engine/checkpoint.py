"""Checkpoint files: written atomically (temporary file + rename), loaded with weights_only=True."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to path.tmp, fsync, then rename over path, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU/CUDA, numpy, python) as tensors, so weights_only loading accepts them."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": torch.tensor([pos, has_gauss]), "numpy_gauss": torch.tensor(gauss, dtype=torch.float64),
             "python_seed": torch.tensor(random.getrandbits(62))}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"])))
    # Python's own state is a 625-tuple of ints; we reseed it deterministically instead of storing it.
    random.seed(int(state["python_seed"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
