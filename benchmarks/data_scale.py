"""Data beyond memory: the in-memory path (data.name=npz) against streaming (data.name=parquet) as the data set
grows, 2 workers, the `make train` MLP (jobs/mlp_digits.yaml) on N rows x 64 float32 features, 10 classes.

Memory: each size runs the real command line (embedded Ray, 20 steps, no checkpoints) while a sampler thread reads
every SAMPLE_S the RSS and USS (a process's own pages) of the dtrain driver, of each Ray Train worker and of every
other worker process of its Ray (Ray Data's read and transform tasks), and the growth of the machine's shared memory
(Ray's object store lives there; machine-wide, so other work on the machine shows in it too). The stream has its own
validation and test files (data.val_path, data.test_path: EVAL_ROWS rows each), as a data set too large for memory
would: a seeded split of data.path would read all of it again for every evaluation. The in-memory run holds out
1 % for each. Time to first step: from the command's start to the first step's time stamp in
metrics.jsonl. A run is stopped when the machine has less than --reserve-gib of memory left: it is reported as
failed, with the peaks it reached.

Throughput: on one set that fits in memory, runs of each path take turns (--pairs of them), each --steps steps;
steady samples/s is the median over the logged windows after the first --skip-logs.

The same rows (seeded per file of 1e6 rows) are written once as Parquet files of ROWS_PER_FILE rows and, for the
in-memory path, as one .npz (written piecewise, so the writer never holds the set).

    python -m benchmarks.data_scale [--rows 100000,1000000,10000000,40000000] [--memory-rows ...] [--pairs 3]
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from benchmarks.common import median, save

ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_FILE = 1_000_000
FEATURES = 64
SAMPLE_S = 0.5
"""Seconds between memory samples (reading a process's USS is not free: /proc/<pid>/smaps)."""
EVAL_ROWS = 20_000
JOB = ["logging.progress=false", "logging.wandb.enabled=false", "trainer.early_stopping.monitor=null",
       "checkpoint.every_n_epochs=0", "data.val_fraction=0.01", "data.test_fraction=0.01"]


def _chunks(rows: int, seed: int = 0) -> Any:
    """(x, y) pieces of the data set, each from its own seed: the same rows whichever file format is written."""
    teacher = np.random.default_rng(12345).standard_normal((FEATURES, 10)).astype(np.float32)
    for index, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        rng = np.random.default_rng([seed, index])
        x = rng.standard_normal((min(ROWS_PER_FILE, rows - start), FEATURES), dtype=np.float32)
        yield x, (x @ teacher).argmax(1).astype(np.int64)


def write_parquet(folder: Path, rows: int, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    size = 0
    for index, (x, y) in enumerate(_chunks(rows, seed)):
        table = pa.table({**{f"f{j}": x[:, j] for j in range(FEATURES)}, "label": y})
        pq.write_table(table, folder / f"part-{index:05d}.parquet")
        size += x.nbytes
    return size


def write_npz(path: Path, rows: int) -> None:
    """An .npz with x (rows, 64) float32 and y, written piece by piece (an .npz is a zip of .npy files)."""
    with zipfile.ZipFile(path, "w", allowZip64=True) as archive:
        for key, shape, dtype in (("x", (rows, FEATURES), np.float32), ("y", (rows,), np.int64)):
            with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                        "shape": shape})
                for x, y in _chunks(rows):
                    f.write((x if key == "x" else y).tobytes())


def _kind(proc: psutil.Process) -> str | None:
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return None
    if "RayTrainWorker" in cmd:
        return "worker"
    if cmd.startswith("ray::") and "TrainController" not in cmd:
        return "data_task"
    return None


def watch(cmd: list[str], reserve_gib: float) -> tuple[dict[str, float], float, str | None]:
    """Run cmd, sampling memory: (peak bytes per kind, seconds to the end, why it failed or None)."""
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    driver = psutil.Process(proc.pid)
    top = {k: 0.0 for k in ("driver", "driver_uss", "worker", "worker_uss", "data_task", "data_task_uss", "shm")}
    shm0 = psutil.virtual_memory().shared
    done, failure = threading.Event(), []

    def sample() -> None:
        while not done.is_set():
            found = [("driver", driver)]
            try:  # the embedded Ray's processes descend from the driver (its raylet starts the workers)
                for p in driver.children(recursive=True):
                    kind = _kind(p)
                    if kind:
                        found.append((kind, p))
            except psutil.Error:
                pass
            for name, p in found:
                try:
                    mem = p.memory_full_info()
                except psutil.Error:
                    continue
                top[name] = max(top[name], mem.rss)
                top[f"{name}_uss"] = max(top[f"{name}_uss"], mem.uss)
            machine = psutil.virtual_memory()
            top["shm"] = max(top["shm"], machine.shared - shm0)
            if machine.available < reserve_gib * 2**30 and not failure:
                failure.append(f"stopped: the machine had {machine.available / 2**30:.1f} GiB left")
                for p in [driver, *driver.children(recursive=True)]:
                    try:
                        p.send_signal(signal.SIGKILL)
                    except psutil.Error:
                        pass
            time.sleep(SAMPLE_S)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate(timeout=3600)
    done.set()
    thread.join()
    if failure:
        return top, time.time() - started, failure[0]
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return top, time.time() - started, None


def _events(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e.get("event") == kind]


def _command(path_kind: str, data: Path, runs: Path, name: str, extra: list[str]) -> list[str]:
    evals = data.parent / "eval"
    data_args = ["data.name=npz", f"data.path={data}"] if path_kind == "memory" else \
        ["data.name=parquet", f"data.path={data}", f"data.val_path={evals / 'val'}", f"data.test_path={evals / 'test'}"]
    return [sys.executable, "-m", "dtrain", "train", str(ROOT / "jobs" / "mlp_digits.yaml"), *data_args,
            f"runs_dir={runs}", f"name={name}", *JOB, *extra, "--ray"]


def memory_run(path_kind: str, data: Path, runs: Path, rows: int, size: int, reserve_gib: float) -> dict[str, Any]:
    name = f"{path_kind}-{rows}"
    started = time.time()
    top, seconds, failure = watch(_command(path_kind, data, runs, name, ["trainer.max_steps=20",
                                                                         "trainer.log_every_n_steps=1"]), reserve_gib)
    row = {"path": path_kind, "rows": rows, "feature_bytes": size, "seconds": seconds, "failed": failure,
           **{f"{k}_peak_mib": v / 2**20 for k, v in top.items()}}
    if not failure:
        row["first_step_s"] = _events(runs / name, "step")[0]["time"] - started
    shown = failure or f"first step after {row['first_step_s']:.1f} s"
    print(f"{path_kind:>6} {rows:>10,} rows ({size / 2**20:,.0f} MiB): driver {row['driver_peak_mib']:,.0f} MiB "
          f"RSS ({row['driver_uss_peak_mib']:,.0f} USS), worker {row['worker_peak_mib']:,.0f} RSS "
          f"({row['worker_uss_peak_mib']:,.0f} USS), Ray Data task {row['data_task_peak_mib']:,.0f} RSS, "
          f"shared memory +{row['shm_peak_mib']:,.0f} MiB; {shown}", flush=True)
    return row


def throughput(npz: Path, parquet: Path, runs: Path, pairs: int, steps: int, skip: int, every: int
               ) -> dict[str, Any]:
    speeds: dict[str, list[float]] = {"memory": [], "stream": []}
    for pair in range(pairs):
        for path_kind, data in (("memory", npz), ("stream", parquet)) if pair % 2 == 0 else \
                (("stream", parquet), ("memory", npz)):
            name = f"speed-{path_kind}-{pair}"
            cmd = _command(path_kind, data, runs, name, [f"trainer.max_steps={steps}",
                                                         f"trainer.log_every_n_steps={every}"])
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
            windows = [e["samples_per_s"] for e in _events(runs / name, "step")][skip:]
            speeds[path_kind].append(median(windows))
            print(f"  {path_kind}: {speeds[path_kind][-1]:,.0f} samples/s (median of {len(windows)} windows of "
                  f"{every} steps)", flush=True)
    ratios = [s / m for s, m in zip(speeds["stream"], speeds["memory"], strict=True)]
    return {"steps": steps, "samples_per_s": speeds, "stream_vs_memory": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,1000000,10000000,40000000")
    parser.add_argument("--memory-rows", default=None, help="sizes for the in-memory path (default: --rows)")
    parser.add_argument("--speed-rows", type=int, default=1_000_000)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--skip-logs", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--reserve-gib", type=float, default=2.5)
    parser.add_argument("--tmp", default=None, help="folder for the generated files (needs ~2x the largest set)")
    parser.add_argument("--out", default=None, help="the results folder (default benchmarks/results)")
    args = parser.parse_args()
    JOB.append(f"data.batch_size={args.batch_size}")
    sizes = [int(r) for r in args.rows.split(",")]
    in_memory = {int(r) for r in (args.memory_rows or args.rows).split(",")}
    runs_out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        runs = tmp / "runs"
        write_parquet(tmp / "eval" / "val", EVAL_ROWS, seed=1)
        write_parquet(tmp / "eval" / "test", EVAL_ROWS, seed=2)
        for rows in sizes:
            parquet, npz = tmp / f"pq{rows}", tmp / f"rows{rows}.npz"
            size = write_parquet(parquet, rows)
            runs_out.append(memory_run("stream", parquet, runs, rows, size, args.reserve_gib))
            save("data_scale", {"runs": runs_out}, args.out)  # so far: a long run's sizes are kept as they end
            if rows in in_memory:
                write_npz(npz, rows)
                runs_out.append(memory_run("memory", npz, runs, rows, size, args.reserve_gib))
                save("data_scale", {"runs": runs_out}, args.out)
                npz.unlink()
            if rows != args.speed_rows:
                _remove(parquet)
        speed = None
        if args.pairs:
            parquet, npz = tmp / f"pq{args.speed_rows}", tmp / "speed.npz"
            if not parquet.exists():
                write_parquet(parquet, args.speed_rows)
            write_npz(npz, args.speed_rows)
            print(f"throughput on {args.speed_rows:,} rows, batch {args.batch_size} per worker:", flush=True)
            speed = throughput(npz, parquet, runs, args.pairs, args.steps, args.skip_logs, args.log_every)
            speed["rows"] = args.speed_rows
            r = speed["stream_vs_memory"]
            print(f"streaming / in-memory samples/s: median {median(r):.3f} (range {min(r):.3f}-{max(r):.3f})")
    payload = {"batch_size": args.batch_size, "rows_per_file": ROWS_PER_FILE, "runs": runs_out, "throughput": speed}
    print(f"results: {save('data_scale', payload, args.out)}")


def _remove(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()


if __name__ == "__main__":
    main()
