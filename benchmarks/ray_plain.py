"""A plain Ray Train script (no dtrain launcher): the start-up baseline. Writes the first step's time to argv[1]."""

from __future__ import annotations

import sys
import time


def train_func(config: dict) -> None:
    """The catalog MLP on digits with torch DDP, one epoch; rank 0 stamps the first step."""
    import ray.train.torch
    import sklearn.datasets
    import torch
    import torch.nn.functional as F

    x, y = sklearn.datasets.load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10))
    model = ray.train.torch.prepare_model(net)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    for step, start in enumerate(range(0, len(x), 64)):
        idx = torch.arange(start, min(start + 64, len(x)))[rank::world]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 0 and rank == 0:
            with open(config["stamp"], "w") as f:
                f.write(repr(time.time()))
    ray.train.report({"loss": loss.item()})


def main() -> None:
    import os

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    ray.init(num_cpus=os.cpu_count(), _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
    trainer = TorchTrainer(train_func, train_loop_config={"stamp": sys.argv[1]},
                           scaling_config=ScalingConfig(num_workers=2),
                           run_config=RunConfig(storage_path=os.path.dirname(os.path.abspath(sys.argv[1]))))
    trainer.fit()


if __name__ == "__main__":
    main()
