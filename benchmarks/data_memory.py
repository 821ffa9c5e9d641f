"""Memory of the in-memory data path: peak memory of the `dtrain train` driver and of each worker above their
baseline, per data set size (generated .npz of N rows x 64 float32 features, 10 classes).

Each size runs the real command line (2 workers, 20 steps, no checkpoints) while a sampler thread reads the memory
of the driver and of every worker process every 100 ms: RSS (which counts the shared pages a process touched, such
as Ray's object store) and USS (its own pages only). The baseline is the same run on a 1,000-row file. Ratios are
(peak - baseline) / size of the feature array. --launcher ray (the default): `dtrain train --ray`, whose workers are
the RayTrainWorker processes; local: `dtrain train --local`, whose workers are the processes the command starts
(its fork server and the ranks forked from it).

    python -m benchmarks.data_memory [--rows 100000,1000000,4000000] [--launcher ray|local]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from benchmarks.common import save

ROOT = Path(__file__).resolve().parents[1]


def write_npz(path: Path, rows: int) -> int:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 64)).astype(np.float32)
    np.savez(path, x=x, y=rng.integers(0, 10, rows))
    return x.nbytes


def peaks(npz: Path, runs: Path, launcher: str = "ray") -> dict[str, float]:
    """Peak RSS and USS (bytes) of the driver and of the largest worker during one run."""
    cmd = [sys.executable, "-m", "dtrain", "train", str(ROOT / "jobs" / "mlp_digits.yaml"), "data.name=npz",
           f"data.path={npz}", f"runs_dir={runs}", f"name={npz.stem}", "trainer.max_steps=20",
           "checkpoint.every_n_epochs=0", "logging.progress=false", "logging.wandb.enabled=false",
           "trainer.early_stopping.monitor=null", f"--{launcher}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver, top = psutil.Process(proc.pid), {"driver": 0.0, "worker": 0.0, "driver_uss": 0.0, "worker_uss": 0.0}
    done = threading.Event()

    def workers() -> list[psutil.Process]:
        if launcher == "local":
            return driver.children(recursive=True)
        return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]

    def sample() -> None:
        while not done.is_set():
            try:
                for name, p in [("driver", driver)] + [("worker", p) for p in workers()]:
                    try:
                        mem = p.memory_full_info()
                    except psutil.Error:  # a process that ended since it was listed
                        continue
                    top[name] = max(top[name], mem.rss)
                    top[f"{name}_uss"] = max(top[f"{name}_uss"], mem.uss)
            except psutil.Error:
                pass
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate(timeout=1800)
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(err[-2000:])
    return top


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000,4000000")
    parser.add_argument("--launcher", choices=["ray", "local"], default="ray")
    parser.add_argument("--out", default=None, help="the results folder (default benchmarks/results)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        base_file = Path(tmp) / "base.npz"
        write_npz(base_file, 1000)
        base = peaks(base_file, Path(tmp) / "runs", args.launcher)
        for rows in (int(r) for r in args.rows.split(",")):
            npz = Path(tmp) / f"rows{rows}.npz"
            size = write_npz(npz, rows)
            top = peaks(npz, Path(tmp) / "runs", args.launcher)
            npz.unlink()
            row = {"rows": rows, "feature_bytes": size,
                   **{f"{k}_x": (top[k] - base[k]) / size for k in top},
                   **{f"{k}_peak_mib": top[k] / 2**20 for k in top}}
            print(f"{rows:>9} rows ({size / 2**20:.0f} MiB) above baseline: driver {row['driver_x']:.2f}x RSS, "
                  f"{row['driver_uss_x']:.2f}x USS; each worker {row['worker_x']:.2f}x RSS, "
                  f"{row['worker_uss_x']:.2f}x USS", flush=True)
            results.append(row)
    name = "data_memory" if args.launcher == "ray" else "data_memory_local"
    print(f"results: {save(name, {'launcher': args.launcher, 'baseline': base, 'runs': results}, args.out)}")


if __name__ == "__main__":
    main()
