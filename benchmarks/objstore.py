"""Run directories in object storage vs a local folder (docs/storage.md), on moto's S3 server on 127.0.0.1.

1. Checkpoint persist time: a checkpoint folder (model + Adam state, written with torch.save, sealed by a manifest)
   copied into the run's storage the way Ray Train persists it (pyarrow.fs.copy_files), to a local folder and to
   S3, for the benchmark MLP (64-256-128-10) and for a model with ~100 MB of weights (a 5000x5000 linear layer),
   taking turns (order rotating each repeat).
2. steps/s of a real `dtrain train` run (the make-train MLP job, 2 Ray Train workers, a checkpoint every 5 steps),
   runs_dir local vs s3://, taking turns: whether checkpointing to the bucket stalls training beyond a local folder.

    python -m benchmarks.objstore [--repeats 3] [--train-repeats 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch

from benchmarks.common import median, save
from dtrain.engine.checkpoint import write_manifest

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"mlp": lambda: torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Linear(256, 128),
                                            torch.nn.Linear(128, 10)),
          "100MB": lambda: torch.nn.Linear(5000, 5000)}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true", AWS_ENDPOINT_URL=url)
    from pyarrow.fs import S3FileSystem

    deadline = time.monotonic() + 60
    while True:
        try:
            S3FileSystem(endpoint_override=url, allow_bucket_creation=True).create_dir("bench")
            return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            time.sleep(0.3)


def checkpoint_folder(model: torch.nn.Module, folder: Path) -> float:
    """Write a checkpoint like a rank does (model + Adam state + manifest); returns its size in MB."""
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(1, model[0].in_features if isinstance(model, torch.nn.Sequential) else 5000)).sum().backward()
    opt.step()
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, folder / "model.pt")
    write_manifest(folder, 0, 1, {"step": 1})
    return sum(p.stat().st_size for p in folder.iterdir()) / 1e6


def persist(folder: Path, target: str) -> float:
    """Seconds to copy the folder into target (a local path or s3:// URI), as Ray Train persists a checkpoint."""
    from pyarrow.fs import FileSystem, LocalFileSystem, copy_files

    fs, path = FileSystem.from_uri(target)
    start = time.perf_counter()
    fs.create_dir(path)  # as Ray Train does before copying
    copy_files(str(folder), path, source_filesystem=LocalFileSystem(), destination_filesystem=fs)
    return time.perf_counter() - start


def train_steps_s(runs_dir: str, name: str) -> float:
    """Optimizer steps per second of the run's loop (summary: steps / wall_time_s)."""
    from dtrain.config import load_job
    from dtrain.launch.train import fit_job

    job = load_job(ROOT / "jobs" / "mlp_digits.yaml", [
        f"runs_dir={runs_dir}", f"name={name}", "trainer.max_epochs=6", "trainer.early_stopping.monitor=null",
        "checkpoint.every_n_steps=5", "logging.progress=false", "logging.wandb.enabled=false"])
    summary = fit_job(job)
    return summary["steps"] / summary["wall_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    proc, url = start_moto()
    tmp = Path(tempfile.mkdtemp(prefix="dtrain-bench-objstore-"))
    try:
        persist_s: dict[str, dict[str, list[float]]] = {}
        sizes = {}
        for name, build in MODELS.items():
            sizes[name] = checkpoint_folder(build(), tmp / "src" / name)
            persist_s[name] = {"local": [], "s3": []}
            for rep in range(args.repeats):
                for where in (("local", "s3") if rep % 2 == 0 else ("s3", "local")):
                    target = str(tmp / "dst" / uuid.uuid4().hex) if where == "local" else \
                        f"s3://bench/{uuid.uuid4().hex}"
                    persist_s[name][where].append(persist(tmp / "src" / name, target))
            print(f"{name} ({sizes[name]:.1f} MB): persist local {median(persist_s[name]['local']):.3f} s, "
                  f"s3 {median(persist_s[name]['s3']):.3f} s", flush=True)
        steps_s: dict[str, list[float]] = {"local": [], "s3": []}
        for rep in range(args.train_repeats):
            for where in (("local", "s3") if rep % 2 == 0 else ("s3", "local")):
                runs = str(tmp / "runs") if where == "local" else f"s3://bench/runs-{uuid.uuid4().hex[:6]}"
                steps_s[where].append(train_steps_s(runs, f"{where}{rep}"))
        ratio = [s / local for s, local in zip(steps_s["s3"], steps_s["local"], strict=True)]
        if ratio:
            print(f"train mlp: local {median(steps_s['local']):.1f} steps/s, s3 {median(steps_s['s3']):.1f} "
                  f"steps/s, s3/local {median(ratio):.3f} (range {min(ratio):.3f}-{max(ratio):.3f})", flush=True)
        payload = {"checkpoint_mb": sizes, "persist_s": persist_s, "train_steps_s": steps_s,
                   "train_s3_vs_local": ratio}
        print(f"results: {save('objstore', payload, Path(args.out) if args.out else None)}")
    finally:
        proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
