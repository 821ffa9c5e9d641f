"""The per-step cost of the preemption vote (dtrain.engine.dist.StepVote) on the training thread, on CPU.

Two gloo processes on 127.0.0.1 each run --steps steps of the overhead job's shape (an MLP 64 -> 1024 -> 1024 -> 10
forward and backward on 64 rows, DDP all-reduce of its gradients); at each step boundary they call
StepVote.agree(), which waits for the vote started one step earlier (done by then) and starts the next. Reported:
the median and 90th percentile of the time spent in agree() per step on rank 0, and the median step time, so
the vote's share of a step.

    python -m benchmarks.stop_vote [--steps 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.launch.net import free_port


def _rank(rank: int, port: int, steps: int, out: mp.SimpleQueue) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from dtrain.engine.dist import StepVote

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    net = torch.nn.Sequential(torch.nn.Linear(64, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                              torch.nn.ReLU(), torch.nn.Linear(1024, 10))
    model, x = DistributedDataParallel(net), torch.randn(64, 64)
    vote, in_vote, step_times = StepVote(60.0), [], []
    for step in range(steps):
        started = time.perf_counter()
        model(x).sum().backward()
        before = time.perf_counter()
        vote.agree(step, False)
        ended = time.perf_counter()
        in_vote.append(ended - before)
        step_times.append(ended - started)
    vote.close()
    if rank == 0:
        out.put((in_vote[steps // 10:], step_times[steps // 10:]))  # the first tenth is warm-up
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()
    out = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(free_port(), args.steps, out), nprocs=2, start_method="spawn")
    in_vote, steps = out.get()
    q = statistics.quantiles(in_vote, n=10)
    median_vote, median_step = statistics.median(in_vote), statistics.median(steps)
    print(f"StepVote.agree() per step: median {median_vote * 1e6:.0f} us, p90 {q[-1] * 1e6:.0f} us; "
          f"median step {median_step * 1e3:.2f} ms ({100 * median_vote / median_step:.2f} % of it)")


if __name__ == "__main__":
    main()
