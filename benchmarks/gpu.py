"""GPU benchmarks (run on a lent GPU): matmul ceiling, fp32/bf16/fp16 throughput and MFU, data pipeline, hot path.

    python -m benchmarks.gpu [--out DIR] [--quick]

Writes gpu.json, and profile_small_mlp.txt (torch.profiler table of the engine's step on a small MLP, where
per-step host overhead shows), into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import hot_path, precision
from benchmarks.common import median, save, synthetic_classification
from dtrain.data.base import BatchPlan
from dtrain.data.sharding import InMemoryLoader


def matmul_ceiling(n: int = 8192, repeats: int = 10) -> dict[str, float]:
    """TFLOP/s of an n x n x n matrix product on random data per dtype (the measured ceiling for MFU)."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("tf32", torch.float32), ("bf16", torch.bfloat16),
                        ("fp16", torch.float16)):
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[name] = 2 * n**3 / median(times) / 1e12
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def loader_rate(batch: int, shape: tuple[int, ...], n_batches: int = 50) -> dict[str, float]:
    """Samples/s of the engine's InMemoryLoader alone (permute + gather on the GPU), with nothing to train."""
    x, y = synthetic_classification(batch * n_batches, shape, 10, device="cuda")
    loader = InMemoryLoader((x, y), BatchPlan(batch), 0, shuffle=True, seed=0)
    rates = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for b in loader.iter_from(0):
            b.tensors[0].sum()  # touch the batch so the gather really runs
        torch.cuda.synchronize()
        rates.append(batch * n_batches / (time.perf_counter() - started))
    return {"batch": batch, "shape": list(shape), "loader_samples_s": median(rates)}


def fused_adam(repeats: int) -> list[dict[str, Any]]:
    """Hand loop on the large MLP with torch's default (foreach) Adam against its fused Adam kernel."""
    work = precision.works("cuda", False)[0]
    x, y = synthetic_classification(work.batch * work.steps, work.shape, work.classes, device="cuda")
    rows = []
    for prec in ("32", "bf16-mixed"):
        rate = {f: median([precision.hand_loop(work, prec, torch.device("cuda"), x, y, fused=f)
                           for _ in range(repeats)]) for f in (None, True)}
        rows.append({"work": work.name, "precision": prec, "foreach_steps_s": rate[None], "fused_steps_s": rate[True],
                     "fused_speedup": rate[True] / rate[None]})
    return rows


def profile_small_mlp(path: Path) -> dict[str, int]:
    """torch.profiler over the engine's steps on the small MLP; writes the op table, returns host-sync counts."""
    from torch.profiler import ProfilerActivity, profile

    work = hot_path.small_mlp(steps=100, warmup=20)
    x, y = synthetic_classification(work.batch * work.steps, work.shape, work.classes, device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        precision.engine_loop(work, "32", torch.device("cuda"), x, y, log_every=20)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    path.write_text(table + "\n")
    counts = {e.key: e.count for e in prof.key_averages()}
    return {k: counts.get(k, 0) for k in ("aten::item", "aten::_local_scalar_dense", "cudaStreamSynchronize",
                                          "cudaMemcpyAsync", "aten::index_select", "aten::randperm")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="sections to skip, e.g. fused,profile")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA GPU here")
    skip = set(args.skip.split(","))
    out = Path(args.out) if args.out else None
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(0)}
    if "ceiling" not in skip:
        result["matmul_tflops"] = matmul_ceiling(2048 if args.quick else 8192)
        print("matmul ceiling TFLOP/s:", {k: round(v, 1) for k, v in result["matmul_tflops"].items()}, flush=True)
    if "precision" not in skip:
        result["precision"] = precision.run("cuda", args.quick, args.repeats)
        result["loader"] = [loader_rate(2048, (1024,)), loader_rate(256, (3, 64, 64))]
        print("loader:", result["loader"], flush=True)
        save("gpu", result, out)
    if "fused" not in skip:
        result["fused_adam"] = fused_adam(args.repeats)
        print("fused adam:", result["fused_adam"], flush=True)
        save("gpu", result, out)
    if "small" not in skip:
        result["small_mlp"] = hot_path.run("cuda", 600 if args.quick else 3000)
        print("small mlp:", result["small_mlp"], flush=True)
        save("gpu", result, out)
    if "profile" not in skip:
        folder = out or Path(__file__).resolve().parent / "results"
        folder.mkdir(parents=True, exist_ok=True)
        result["profile_counts"] = profile_small_mlp(folder / "profile_small_mlp.txt")
        print("profile counts:", result["profile_counts"], flush=True)
    print(save("gpu", result, out))


if __name__ == "__main__":
    main()
