"""A hand-written multi-process DDP script: the baseline for start-up (what a user writes without a framework).

Two gloo processes (torch.multiprocessing), the digits MLP of jobs/mlp_digits.yaml, one epoch; the wall-clock time
of the first optimizer step goes to the stamp file given as the first argument.

    python -m benchmarks.hand_ddp STAMP
"""

from __future__ import annotations

import os
import sys
import time


def worker(rank: int, world: int, stamp: str) -> None:
    import torch
    import torch.distributed as dist
    from sklearn.datasets import load_digits
    from torch import nn

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y = load_digits(return_X_y=True)
    x = torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-8), dtype=torch.float32)
    y = torch.tensor(y)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)))
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)[rank::world]
    for i, start in enumerate(range(0, len(order), 32)):
        idx = order[start:start + 32]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optim.zero_grad()
        loss.backward()
        optim.step()
        if i == 0 and rank == 0:
            with open(stamp, "w") as f:
                f.write(str(time.time()))
    dist.destroy_process_group()


def main() -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port: a fixed one can be taken, and then the run fails
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    mp.spawn(worker, args=(2, sys.argv[1]), nprocs=2)


if __name__ == "__main__":
    main()
