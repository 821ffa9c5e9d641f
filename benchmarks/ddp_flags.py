"""DistributedDataParallel's options on the overhead job, measured in turns: which one dtrain's DDP wrapper should set.

Three of benchmarks.paired's hand-written loops, each over its own copy of the overhead job's model (catalog MLP
64 -> 1024 -> 1024 -> 10 on digits, 64 rows per rank, fused Adam, zero_grad(set_to_none=True)) and wrapped in DDP
with other options, live in the same 2 gloo processes and take turns of --block steps (the order rotates every
turn, so none always follows the same one):

  default        DistributedDataParallel(model), as a hand-written loop has it
  bucket_view    gradient_as_bucket_view=True (dtrain's choice): the all-reduced buckets become the gradients
  batched_copy   batched_grad_copy=True: gradients copied into the buckets with one _foreach_copy_ per bucket

Reported: steps/s of each, and its speed relative to default with a bootstrap 95 % interval over the turns.

    python -m benchmarks.ddp_flags [--steps 2000] [--block 50]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.common import save
from benchmarks.paired import WARMUP_PAIRS, _data, _HandLoop, _job, ratio_ci

VARIANTS = {"default": {}, "bucket_view": {"gradient_as_bucket_view": True},
            "batched_copy": {"batched_grad_copy": True}}


def _rank(rank: int, world: int, port: int, steps: int, block: int, out_file: str) -> None:
    from dtrain.config import to_objects
    from dtrain.models import build_model

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    job_dict = _job("digits", steps, 10, world)
    job, data = to_objects(job_dict), _data(job_dict, "digits")
    torch.manual_seed(0)
    net = build_model(job.model, data.meta).net
    loops = {name: _HandLoop(net, job, *data.train, rank, world, torch.device("cpu"), metrics=False,
                             ddp_options=options) for name, options in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for turn in range(steps // block):
        for name in names[turn % len(names):] + names[:turn % len(names)]:
            times[name].append(loops[name].run(block))
    if rank == 0:
        Path(out_file).write_text(json.dumps(times))
    dist.barrier()
    dist.destroy_process_group()


def measure(steps: int = 2000, block: int = 50, world: int = 2) -> dict[str, Any]:
    from dtrain.launch.net import free_port

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.start_processes(_rank, args=(world, free_port(), steps, block, out), nprocs=world, start_method="spawn")
        times = {k: v[WARMUP_PAIRS:] for k, v in json.loads(Path(out).read_text()).items()}
    base = times["default"]
    return {"world": world, "block": block, "turns": len(base), "times_s": times,
            "steps_s": {k: block * len(v) / sum(v) for k, v in times.items()},
            "speed_vs_default": {k: sum(base) / sum(v) for k, v in times.items() if k != "default"},
            "speed_vs_default_ci95": {k: ratio_ci(base, v) for k, v in times.items() if k != "default"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    r = measure(args.steps, args.block)
    for name, speed in r["speed_vs_default"].items():
        lo, hi = r["speed_vs_default_ci95"][name]
        print(f"[ddp_flags] {name}: {r['steps_s'][name]:.1f} steps/s, {speed:.3f} x default "
              f"(95 % interval {lo:.3f}-{hi:.3f}); default {r['steps_s']['default']:.1f} steps/s", flush=True)
    print(save("ddp_flags", r, args.out))


if __name__ == "__main__":
    main()
