"""Mixed precision throughput: fp32 vs bf16 (vs fp16 on a GPU) for a large MLP and a CNN, one process.

Each configuration runs twice side by side: a hand-written PyTorch loop (autocast + GradScaler, Adam, in-memory
batches by index) and dtrain's engine (DDPStrategy + loop.fit on the same model, data and batch). Throughput is the
steady state after warm-up steps; achieved FLOP/s counts forward + backward with torch's FlopCounterMode.

    python -m benchmarks.precision [--device cpu|cuda] [--quick]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import BenchCNN, median, save, synthetic_classification
from dtrain.config import build_job, to_objects
from dtrain.data.base import DataBundle
from dtrain.engine.loop import RunContext, fit
from dtrain.launch.worker import build_worker
from dtrain.models.base import DataMeta
from dtrain.models.mlp import MLP, MLPConfig

AUTOCAST = {"32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}
# Dense (no sparsity) peak rates of an H100 SXM5 (the H200 has the same) from the datasheet, in TFLOP/s; fp32 is the
# non-tensor-core rate because torch keeps TF32 off for float32 matmuls by default.
H100_PEAK = {"32": 66.9, "bf16-mixed": 989.4, "fp16-mixed": 989.4}


@dataclass
class Work:
    """One model + data shape + batch to benchmark."""

    name: str
    build: Any
    shape: tuple[int, ...]
    classes: int
    batch: int
    steps: int
    warmup: int


def works(device: str, quick: bool) -> list[Work]:
    """The large MLP and the CNN, sized for the device (quick: tiny, for a smoke run)."""
    if quick:
        return [Work("mlp", lambda m: MLP(MLPConfig(hidden=[64, 64]), m), (32,), 10, 32, 12, 3),
                Work("cnn", lambda m: BenchCNN(m, (8, 16)), (3, 16, 16), 10, 16, 12, 3)]
    if device == "cuda":
        return [Work("mlp-4x8192", lambda m: MLP(MLPConfig(hidden=[8192] * 4), m), (1024,), 1000, 2048, 60, 10),
                Work("cnn-vgg6", lambda m: BenchCNN(m, (64, 128, 256)), (3, 64, 64), 100, 256, 60, 10)]
    return [Work("mlp-2x1024", lambda m: MLP(MLPConfig(hidden=[1024, 1024]), m), (256,), 10, 256, 40, 5),
            Work("cnn-vgg6", lambda m: BenchCNN(m, (16, 32, 64)), (3, 32, 32), 10, 64, 20, 4)]


def step_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Floating-point operations of one forward + backward on batch (x, y)."""
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model.predict(x).float(), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(work: Work, precision: str, device: torch.device, x: torch.Tensor, y: torch.Tensor,
              fused: bool | None = True) -> float:
    """Steps/s of the plain PyTorch loop over the steps after warm-up (fused: torch's fused Adam kernel)."""
    torch.manual_seed(0)
    model = work.build(DataMeta(work.shape, num_classes=work.classes)).to(device)
    # The same Adam as the engine's DDPStrategy picks (fused) unless asked otherwise, so the ratio is framework
    # overhead alone.
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16-mixed")
    dtype = AUTOCAST[precision]
    order = torch.randperm(len(x), device=device)
    started = 0.0
    for step in range(work.steps):
        if step == work.warmup:
            _sync(device)
            started = time.perf_counter()
        idx = order[(step * work.batch) % len(x):][:work.batch]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model.predict(x[idx]).float(), y[idx])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return (work.steps - work.warmup) / (time.perf_counter() - started)


def engine_loop(work: Work, precision: str, device: torch.device, x: torch.Tensor, y: torch.Tensor,
                log_every: int = 5) -> float:
    """Steps/s of dtrain's loop.fit with DDPStrategy (one process), timed between logged steps after warm-up."""
    job = to_objects(build_job(_job_cfg(work, precision, log_every)))
    empty = (x[:0], y[:0])
    data = DataBundle((x, y), empty, empty, DataMeta(work.shape, num_classes=work.classes))
    w = build_worker(job, device, data)
    torch.manual_seed(0)
    model = work.build(data.meta)
    stamps: list[tuple[int, float]] = []

    def log(record: dict[str, Any]) -> None:
        if record.get("event") == "step":  # the logged step's metrics were just read back, so the device is idle
            stamps.append((record["step"], time.perf_counter()))

    fit(model, w.loaders, w.strategy, w.loop, RunContext(0, 1, lambda m, f: None, log))
    steady = [(s, t) for s, t in stamps if s >= work.warmup]
    (s0, t0), (s1, t1) = steady[0], steady[-1]
    return (s1 - s0) / (t1 - t0)


def _job_cfg(work: Work, precision: str, log_every: int) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.create({
        "name": "bench", "model": {"name": "mlp"}, "data": {"batch_size": work.batch},
        "optim": {"name": "adam", "lr": 1e-3},
        "trainer": {"max_epochs": 1, "max_steps": work.steps, "precision": precision, "log_every_n_steps": log_every},
        "checkpoint": {"every_n_epochs": 0}, "logging": {"wandb": {"enabled": "false"}}})


def run(device_name: str = "cpu", quick: bool = False, repeats: int = 3,
        precisions: tuple[str, ...] | None = None) -> list[dict[str, Any]]:
    """Benchmark every work x precision; returns one row per pair."""
    device = torch.device(device_name)
    if precisions is None:
        precisions = ("32", "bf16-mixed", "fp16-mixed") if device.type == "cuda" else ("32", "bf16-mixed")
    rows = []
    for work in works(device.type, quick):
        x, y = synthetic_classification(work.batch * work.steps, work.shape, work.classes, device=device)
        probe = work.build(DataMeta(work.shape, num_classes=work.classes)).to(device)
        flops = step_flops(probe, x[:work.batch], y[:work.batch])
        params = sum(p.numel() for p in probe.parameters())
        del probe
        for precision in precisions:
            hand = median([hand_loop(work, precision, device, x, y) for _ in range(repeats)])
            engine = median([engine_loop(work, precision, device, x, y) for _ in range(repeats)])
            row = {"work": work.name, "params": params, "batch": work.batch, "precision": precision,
                   "hand_steps_s": hand, "engine_steps_s": engine, "engine_vs_hand": engine / hand,
                   "flops_per_step": flops, "engine_tflops": engine * flops / 1e12, "hand_tflops": hand * flops / 1e12}
            if device.type == "cuda" and any(g in torch.cuda.get_device_name(device) for g in ("H100", "H200")):
                row["engine_mfu"] = row["engine_tflops"] / H100_PEAK[precision]
            rows.append(row)
            print(_fmt(row), flush=True)
        del x, y
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {r["work"]: r["engine_steps_s"] for r in rows if r["precision"] == "32"}
    for r in rows:
        r["speedup_vs_fp32"] = r["engine_steps_s"] / base[r["work"]]
    return rows


def _fmt(r: dict[str, Any]) -> str:
    mfu = f" mfu={r['engine_mfu']:.1%}" if "engine_mfu" in r else ""
    return (f"{r['work']:<12} {r['precision']:<10} hand={r['hand_steps_s']:8.2f} steps/s  engine="
            f"{r['engine_steps_s']:8.2f} steps/s  ratio={r['engine_vs_hand']:.3f}  "
            f"{r['engine_tflops']:.2f} TFLOP/s{mfu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = run(args.device, args.quick, args.repeats)
    print(save(f"precision_{args.device}", {"rows": rows}, args.out))


if __name__ == "__main__":
    main()
