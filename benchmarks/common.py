"""Shared pieces of the benchmarks: machine details, medians, synthetic data, the benchmark CNN, job dicts."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.models.base import CatalogModel, DataMeta, StepOutput, supervised_step

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or
            platform.machine(), "cores": os.cpu_count(), "os": platform.platform(terse=True)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                 "gpu_mem_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return info


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def save(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    """Write payload (plus machine details) to <out_dir or benchmarks/results>/<name>.json."""
    folder = Path(out_dir or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2, default=str) + "\n")
    return path


def synthetic_classification(n: int, shape: tuple[int, ...], classes: int, seed: int = 0,
                             device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Random inputs with labels from a fixed random linear teacher (learnable, so the loss can fall)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    teacher = torch.randn(x[0].numel(), classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(1)
    return x.to(device), y.to(device)


class BenchCNN(CatalogModel):
    """A VGG-style CNN (3x3 conv blocks, batch norm, max-pool) for image throughput benchmarks."""

    def __init__(self, meta: DataMeta, widths: tuple[int, ...] = (64, 128, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = meta.input_shape[0]
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, meta.num_classes))
        self.task = meta.task

    def predict(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward(self, batch: tuple[Tensor, ...]) -> StepOutput:
        return supervised_step(self, batch, self.task)


def mlp_job(hidden: list[int], batch_size: int, epochs: int, precision: str = "32", **trainer: Any) -> dict:
    """A plain job dict for the catalog MLP on digits, with no checkpoints and no W&B (the benchmark setting)."""
    from omegaconf import OmegaConf

    from dtrain.config import build_job, to_dict

    base = OmegaConf.create({
        "name": "bench", "model": {"name": "mlp", "hidden": hidden},
        "data": {"name": "digits", "batch_size": batch_size, "val_fraction": 0.0, "test_fraction": 0.2},
        "optim": {"name": "adam", "lr": 1e-3},
        "trainer": {"max_epochs": epochs, "num_workers": 2, "precision": precision, "log_every_n_steps": 10,
                    "use_gpu": "false", **trainer},
        "checkpoint": {"every_n_epochs": 0}, "logging": {"progress": False, "wandb": {"enabled": "false"}},
    })
    return to_dict(build_job(base))
