"""Checkpoint files and folders: written atomically, sealed by a manifest, verified before resuming.

A checkpoint folder holds every rank's files (Ray Train merges the ranks' folders; the spawn runner does the same)
and one ``manifest_rank<r>.json`` per rank, written after that rank's files: name, size and sha256 of each file,
plus the world size and training position. A folder is usable only if the manifests of all ranks are present and
every listed file matches, so a truncated or corrupt checkpoint is detected before anything is loaded from it.
Tensors are loaded with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import mmap
import os
import random
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtrain.errors import DtrainError

MANIFEST = "manifest_rank{rank}.json"


class CheckpointError(DtrainError):
    """No usable checkpoint to resume from (all candidates missing, truncated or corrupt)."""


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to path.tmp, fsync, then rename over path, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def to_cpu(obj: Any) -> Any:
    """A copy of obj (dicts, lists, tuples of tensors and values) whose tensors are detached copies on the CPU: a
    snapshot that training can no longer change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True onto the CPU."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    """The file's sha256, hashed from a memory map in one call, which releases the GIL for the whole file. Read in
    blocks, the hashing thread takes the GIL back twice a block: a background writer hashing a large checkpoint that
    way keeps taking it from the training thread, and waits its turn for it each time."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def write_manifest(folder: Path, rank: int, world: int, info: dict[str, Any]) -> None:
    """Seal the files this rank wrote into its folder: manifest_rank<rank>.json (size + sha256 each), written last."""
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not p.name.startswith("manifest_rank"))
    entries = {name: {"size": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in files}
    body = json.dumps({"rank": rank, "world": world, "files": entries, **info}, indent=1)
    path = folder / MANIFEST.format(rank=rank)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path, rank: int = 0) -> dict[str, Any] | None:
    """A rank's manifest, or None if it is missing or unreadable."""
    try:
        return json.loads((Path(folder) / MANIFEST.format(rank=rank)).read_text())
    except (OSError, ValueError):
        return None


def checkpoint_problem(folder: Path) -> str | None:
    """Why folder is not a complete, intact checkpoint (one line), or None if every rank's files check out."""
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    head = read_manifest(folder, 0)
    if head is None:
        return f"{MANIFEST.format(rank=0)} is missing or unreadable"
    for rank in range(int(head.get("world", 1))):
        manifest = head if rank == 0 else read_manifest(folder, rank)
        if manifest is None:
            return f"{MANIFEST.format(rank=rank)} is missing or unreadable"
        for name, want in manifest["files"].items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != want["size"]:
                return f"{name} is truncated or changed ({size} bytes, manifest says {want['size']})"
            if _sha256(path) != want["sha256"]:
                return f"{name} is corrupt (sha256 does not match the manifest)"
    return None


def checkpoint_order(folder: Path) -> tuple[int, float]:
    """Sort key, oldest first: the optimizer step its manifest records, then the folder's modification time."""
    manifest = read_manifest(folder, 0) or {}
    step = manifest.get("step", -1)
    try:
        mtime = Path(folder).stat().st_mtime
    except OSError:
        mtime = 0.0
    return (int(step) if isinstance(step, int) else -1, mtime)


def run_checkpoints(run_dir: Path) -> list[Path]:
    """A run directory's checkpoint folders, newest first: Ray Train's checkpoint_<time> and the local launcher's
    checkpoints/step_<step>, so a run started by either launcher resumes under the other."""
    run_dir = Path(run_dir)
    found = [p for p in run_dir.glob("checkpoint_*") if p.is_dir()]
    found += [p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()]
    return sorted(found, key=checkpoint_order, reverse=True)


def pick_checkpoint(candidates: Iterable[Path], warn: bool = True) -> Path | None:
    """The first intact checkpoint of candidates (newest first); each broken one is reported on stderr.

    Returns None when there are no candidates; raises CheckpointError when there are some but none is intact.
    """
    problems = []
    for folder in candidates:
        problem = checkpoint_problem(folder)
        if problem is None:
            if problems and warn:
                print(f"[dtrain] warning: resuming from the previous checkpoint {folder}", file=sys.stderr, flush=True)
            return Path(folder)
        problems.append(f"{folder}: {problem}")
        if warn:
            print(f"[dtrain] warning: checkpoint {folder} is unusable ({problem}); trying the previous one",
                  file=sys.stderr, flush=True)
    if problems:
        raise CheckpointError(f"no usable checkpoint to resume from; newest: {problems[0]}")
    return None


def capture_rng() -> tuple[Any, ...]:
    """This process's RNG states as the libraries return them (cheap: taken on the training thread at a step
    boundary); rng_tensors turns them into what a checkpoint holds."""
    return (torch.get_rng_state(), np.random.get_state(), random.getstate(),
            torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def rng_tensors(captured: tuple[Any, ...]) -> dict[str, Any]:
    """What capture_rng() took (torch CPU/CUDA, numpy, python), as tensors, so weights_only loading accepts them."""
    torch_state, (_, keys, pos, has_gauss, gauss), (version, internal, py_gauss), cuda = captured
    state = {"torch": torch_state,
             "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": torch.tensor([pos, has_gauss]), "numpy_gauss": torch.tensor(gauss, dtype=torch.float64),
             # Python's state is 625 ints below 2**32 (exact in int64), plus an optional cached gaussian.
             "python_state": torch.tensor(internal, dtype=torch.int64),
             "python_gauss": torch.tensor([float("nan") if py_gauss is None else py_gauss], dtype=torch.float64),
             "python_version": torch.tensor(version)}
    if cuda is not None:
        state["cuda"] = cuda
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states rng_tensors holds, so a resumed rank draws the numbers an uninterrupted one would."""
    torch.set_rng_state(state["torch"])
    pos, has_gauss = (int(v) for v in state["numpy_pos"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"])))
    if "python_state" in state:
        gauss = float(state["python_gauss"][0])
        random.setstate((int(state["python_version"]), tuple(int(v) for v in state["python_state"].tolist()),
                         None if gauss != gauss else gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
