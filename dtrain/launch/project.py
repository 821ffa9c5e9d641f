"""Where the user's own code (models, losses, data loaders named by import path) is found, on the driver and in every
process a launcher starts: the job's project directory and the current directory go on the import path."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

MARKERS = ("pyproject.toml", "setup.py", "setup.cfg")


def project_dir(spec: str | Path) -> Path | None:
    """The job file's project: the nearest folder above it holding pyproject.toml, setup.py or setup.cfg; else the
    current directory when the job file lies inside it; else None."""
    spec = Path(spec).resolve()
    for folder in spec.parents:
        if any((folder / marker).is_file() for marker in MARKERS):
            return folder
    cwd = Path.cwd().resolve()
    return cwd if spec.is_relative_to(cwd) else None


def add_user_code(spec: str | Path | None) -> None:
    """Put the job's project directory and the current directory on this process's import path and on PYTHONPATH,
    which every process the launchers start inherits (see shipped_paths)."""
    found = [project_dir(spec)] if spec is not None else []
    use_paths([str(p) for p in [*found, Path.cwd().resolve()] if p is not None])


def shipped_paths() -> list[str]:
    """The folders a training process must import from: this process's PYTHONPATH (with the user's code on it)."""
    return [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def use_paths(folders: Iterable[str]) -> None:
    """Prepend the folders that exist here (a worker on another node may not have them) to sys.path, and to
    PYTHONPATH, so that the processes started from this one (Ray Tune's trials start Ray Train's) have them too."""
    here = [f for f in folders if Path(f).is_dir()]
    sys.path[:0] = [f for f in here if f not in sys.path]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([*here, *shipped_paths()]))
