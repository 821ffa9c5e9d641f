"""PyTorch Lightning's Trainer on the overhead benchmark's work (benchmark-only dependency: the `bench` extra)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy


class MLPModule(L.LightningModule):
    """The catalog MLP's layers with cross-entropy and Adam, timing each batch on rank 0."""

    def __init__(self, job: dict[str, Any], out_file: str) -> None:
        super().__init__()
        from benchmarks.overhead import _setup

        self.cfg, data, model = _setup(job)
        self.net, self.data, self.out_file = model.net, data, out_file
        self.stamps: list[tuple[int, float]] = []

    def train_dataloader(self) -> Any:
        x, y = self.data.train
        # Lightning swaps in a DistributedSampler per rank, so each rank sees batch_size of every global batch.
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                           batch_size=self.cfg.data.batch_size, shuffle=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.stamps.append((self.global_step, time.perf_counter()))

    def on_train_end(self) -> None:
        if self.global_rank == 0:
            Path(self.out_file).write_text(json.dumps(self.stamps))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.cfg.optim.lr, fused=True)  # as the engine builds it

    def setup(self, stage: str) -> None:
        torch.set_num_threads(1)


def train_lightning(job: dict[str, Any], warmup: int, world: int) -> float:
    """Steady-state steps/s of Lightning's Trainer (ddp_spawn over gloo, `world` CPU processes)."""
    from benchmarks.overhead import _steady_rate

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "stamps.json")
        module = MLPModule(job, out)
        trainer = L.Trainer(accelerator="cpu", devices=world, max_epochs=job["trainer"]["max_epochs"],
                            strategy=DDPStrategy(start_method="spawn", process_group_backend="gloo"),
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp)
        trainer.fit(module)
        return _steady_rate([tuple(s) for s in json.loads(Path(out).read_text())], warmup)
