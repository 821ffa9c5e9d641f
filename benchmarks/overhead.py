"""Framework overhead: steady-state steps/s of dtrain against a hand-written DDP loop, side by side in one run.

Every runner trains the same catalog MLP on the same digits split, with the same per-rank batch, Adam, the same
number of processes (gloo on 127.0.0.1, one thread each) and the same number of epochs; throughput counts only the
steps after warm-up. Runners are interleaved and repeated, and each one's median is compared with the hand loop's:

    hand      plain torch DDP, written here (benchmarks.overhead._hand_worker)
    engine    dtrain's engine alone: dtrain.launch.spawn.spawn_workers (no Ray)
    ray       the full `dtrain train` path: dtrain.launch.train.fit_job through Ray Train
    lightning PyTorch Lightning's Trainer (ddp_spawn, gloo) on the same module and data

    python -m benchmarks.overhead [--runners hand,engine,ray,lightning] [--repeats 3] [--boundary] [--paired-steps N]

Whole runs on a shared machine differ by 10-15 % from one to the next; --paired-steps (on by default) also measures
the engine against the hand loop in turns of 50 steps inside the same two processes (benchmarks.paired), which
resolves differences of about 1 %. For Ray runs, the cores kept busy in the steady state by the training workers and
by the rest of Ray are recorded (ray_cores_busy).

--boundary adds the cost of an epoch end on the Ray path (validation, metric reduction, ray.train.report) against
a step inside an epoch, from `dtrain train` with a step event every step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks import paired
from benchmarks.common import median, mlp_job, save


def _setup(job: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(job objects, data, model) exactly as dtrain's worker builds them (same seed, same split, same weights)."""
    from dtrain.config import to_objects
    from dtrain.data import load_data
    from dtrain.models import build_model

    cfg = to_objects(job)
    torch.manual_seed(cfg.trainer.seed)
    data = load_data(cfg.data)
    return cfg, data, build_model(cfg.model, data.meta)


def _steady_rate(stamps: list[tuple[int, float]], warmup: int) -> float:
    steady = [(s, t) for s, t in stamps if s >= warmup]
    (s0, t0), (s1, t1) = steady[0], steady[-1]
    return (s1 - s0) / (t1 - t0)


def _hand_worker(rank: int, port: int, job: dict[str, Any], warmup: int, out_file: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world = job["trainer"]["num_workers"]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg, data, model = _setup(job)
    # The catalog MLP's layers (model.net) as a plain module: the hand loop owns the loss, like any DDP script.
    # One process: the plain module, as dtrain's DDPStrategy uses then.
    ddp = torch.nn.parallel.DistributedDataParallel(model.net, broadcast_buffers=False) if world > 1 else model.net
    opt = torch.optim.Adam(ddp.parameters(), lr=cfg.optim.lr, fused=True)  # as the engine builds it
    stamps = []
    # Every epoch's last, smaller batch too, as the engine trains it.
    for step, (xb, yb) in enumerate(paired.batches(*data.train, cfg.data.batch_size, rank, world,
                                                   epochs=cfg.trainer.max_epochs, drop_last=False), start=1):
        loss = F.cross_entropy(ddp(xb), yb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append((step, time.perf_counter()))
    if rank == 0:
        Path(out_file).write_text(json.dumps(_steady_rate(stamps, warmup)))
    dist.destroy_process_group()


def run_hand(job: dict[str, Any], warmup: int) -> float:
    from dtrain.launch.net import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rate.json")
        mp.start_processes(_hand_worker, args=(free_port(), job, warmup, out), nprocs=job["trainer"]["num_workers"],
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def _metrics_rate(run_dir: Path, warmup: int) -> float:
    """Steady steps/s from the wall-clock stamps of the step events rank 0 wrote to metrics.jsonl."""
    from dtrain.tracking import read_metrics

    return _steady_rate([(r["step"], r["time"]) for r in read_metrics(run_dir) if r.get("event") == "step"], warmup)


def run_engine(job: dict[str, Any], warmup: int) -> float:
    from dtrain.launch.spawn import spawn_workers

    with tempfile.TemporaryDirectory() as tmp:
        spawn_workers(job, tmp, world=job["trainer"]["num_workers"])
        return _metrics_rate(Path(tmp), warmup)


class CpuSampler(threading.Thread):
    """Samples the CPU seconds of this process (the driver) and its descendants while a run lasts, split into the
    driver, Ray Train's training workers and the rest of Ray (GCS, raylet, dashboard, Train controller, idle
    workers): on a machine with few cores the rest competes with training for them."""

    def __init__(self, period: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.period, self.stop = period, threading.Event()
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []

    def run(self) -> None:
        import psutil

        while not self.stop.wait(self.period):
            now, me = time.time(), psutil.Process()
            t = me.cpu_times()
            cpu = {me.pid: ("driver", t.user + t.system)}  # trainer.fit polling, and this sampler
            for proc in me.children(recursive=True):
                try:
                    t, cmd = proc.cpu_times(), " ".join(proc.cmdline())
                except psutil.Error:
                    continue
                cpu[proc.pid] = ("train_workers" if "RayTrainWorker" in cmd else "rest_of_ray", t.user + t.system)
            self.samples.append((now, cpu))

    def cores_between(self, t0: float, t1: float) -> dict[str, float]:
        """Average cores each group kept busy between wall-clock times t0 and t1 (nearest samples inside)."""
        self.stop.set()
        self.join()
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return {}
        (a, first), (b, last) = inside[0], inside[-1]
        out: dict[str, float] = {}
        for pid, (group, cpu) in last.items():
            out[group] = out.get(group, 0.0) + (cpu - first.get(pid, (group, 0.0))[1]) / (b - a)
        return out


RAY_CPU: list[dict[str, float]] = []
"""Per Ray run: cores used during its steady state by the training workers and by the rest of Ray."""


def run_ray(job: dict[str, Any], warmup: int) -> float:
    from omegaconf import OmegaConf

    from dtrain.launch.train import fit_job
    from dtrain.tracking import read_metrics

    with tempfile.TemporaryDirectory() as tmp:
        cfg = OmegaConf.create(job)
        cfg.runs_dir, cfg.name = tmp, "overhead"
        sampler = CpuSampler()
        sampler.start()
        fit_job(cfg)
        steady = [r["time"] for r in read_metrics(Path(tmp) / "overhead") if r.get("event") == "step"
                  and r["step"] >= warmup]
        RAY_CPU.append(sampler.cores_between(steady[0], steady[-1]))
        print(f"[overhead] ray: cores busy in steady state {RAY_CPU[-1]}", flush=True)
        return _metrics_rate(Path(tmp) / "overhead", warmup)


def run_lightning(job: dict[str, Any], warmup: int) -> float:
    from benchmarks.lightning_peer import train_lightning

    return train_lightning(job, warmup, job["trainer"]["num_workers"])


def ray_epoch_boundary(epochs: int = 12) -> dict[str, Any]:
    """`dtrain train` through Ray on the make-train job with a step event every step: the median time between two
    steps inside an epoch against two steps either side of an epoch end (validation, metrics, ray.train.report)."""
    from dtrain.config import load_job
    from dtrain.launch.train import fit_job
    from dtrain.tracking import read_metrics

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        job = load_job(root / "jobs/mlp_digits.yaml", [
            f"runs_dir={tmp}", "name=boundary", f"trainer.max_epochs={epochs}", "trainer.log_every_n_steps=1",
            "trainer.early_stopping.monitor=null", "checkpoint.every_n_epochs=0", "logging.progress=false",
            "logging.wandb.enabled=false"])
        fit_job(job)
        steps = [e for e in read_metrics(Path(tmp) / "boundary") if e["event"] == "step"]
    inside, boundary = [], []
    for a, b in zip(steps, steps[1:]):
        (boundary if int(a["epoch"]) != int(b["epoch"]) else inside).append(b["time"] - a["time"])
    return {"step_inside_epoch_ms": median(inside) * 1e3, "step_across_epoch_end_ms": median(boundary) * 1e3,
            "epochs": epochs}


RUNNERS = {"hand": run_hand, "engine": run_engine, "ray": run_ray, "lightning": run_lightning}


def run(runners: list[str], repeats: int, hidden: list[int], batch: int, epochs: int, warmup: int,
        world: int = 2) -> dict[str, Any]:
    """Interleave the runners `repeats` times; medians and ratios to the hand-written loop."""
    job = mlp_job(hidden, batch, epochs, num_workers=world)
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for rep in range(repeats):
        for name in runners:
            rates[name].append(RUNNERS[name](job, warmup))
            print(f"[overhead] repeat {rep} {name}: {rates[name][-1]:.1f} steps/s", flush=True)
    medians = {name: median(v) for name, v in rates.items()}
    hand = medians.get("hand")
    extra = {"ray_cores_busy": RAY_CPU} if RAY_CPU else {}
    return {"setting": {"model": f"mlp hidden={hidden}", "data": "digits (1437 train)", "batch_per_rank": batch,
                        "processes": world, "epochs": epochs, "warmup_steps": warmup, "repeats": repeats},
            "steps_s": rates, "median_steps_s": medians,
            "ratio_to_hand": {k: v / hand for k, v in medians.items()} if hand else {}, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", default="hand,engine,ray,lightning")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", default="1024,1024")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--world", type=int, default=2, help="processes per runner")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--boundary", action="store_true", help="also time Ray's epoch ends (ray_epoch_boundary)")
    parser.add_argument("--paired-steps", type=int, default=3000,
                        help="steps of the engine-vs-hand measurement in turns (benchmarks.paired); 0: skip")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.runners.split(","), args.repeats, [int(h) for h in args.hidden.split(",")], args.batch,
                 args.epochs, args.warmup, args.world)
    if args.paired_steps:
        result["paired"] = paired.measure("digits", args.world, args.paired_steps)
        print(paired.summary(result["paired"]), flush=True)
    if args.boundary:
        result["ray_epoch_boundary"] = ray_epoch_boundary()
        print("[overhead] ray epoch boundary:", json.dumps(result["ray_epoch_boundary"]), flush=True)
    print(json.dumps(result["median_steps_s"]), json.dumps(result["ratio_to_hand"]))
    print(save("overhead", result, args.out))


if __name__ == "__main__":
    main()
