"""Per-step cost of the engine against a hand-written loop on a small model, where host work sets the pace.

Small MLP 64 -> 256 -> 128 -> 10, batch 256, one process, data on the device (CPU, or CUDA when there is one). The
speed ratio comes from benchmarks.paired (engine and hand loops in turns of 50 steps in one process); one more run
of each loop (benchmarks.precision's hand_loop and engine_loop) counts what torch dispatched per optimizer step:
operations (on a GPU, roughly kernel launches) and device read-backs (item()/float()/bool() of a tensor: on a GPU,
each one stalls the host until the device is idle).

    python -m benchmarks.hot_path [--device cpu|cuda] [--steps 3000] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks import paired, precision
from benchmarks.common import save, synthetic_classification
from dtrain.models.mlp import MLP, MLPConfig

READ_BACK = torch.ops.aten._local_scalar_dense.default
LOG_EVERY = 10  # dtrain's default trainer.log_every_n_steps


def small_mlp(steps: int = 300, warmup: int = 50) -> precision.Work:
    return precision.Work("mlp-small", lambda m: MLP(MLPConfig(hidden=[256, 128]), m), (64,), 10, 256, steps, warmup)


class CountOps(TorchDispatchMode):
    """Counts every aten operation dispatched while active, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def per_step(loop: Any, work: precision.Work, device: torch.device, x: torch.Tensor, y: torch.Tensor,
             **kwargs: Any) -> dict[str, Any]:
    """Operations and read-backs per optimizer step of one run of loop (warm-up included: it does the same work)."""
    with CountOps() as counter:
        loop(work, "32", device, x, y, **kwargs)
    total = sum(counter.ops.values())
    return {"ops_per_step": total / work.steps, "read_backs_per_step": counter.ops["_local_scalar_dense"] / work.steps,
            "top_ops": dict(counter.ops.most_common(12))}


def run(device_name: str, steps: int = 3000) -> dict[str, Any]:
    device = torch.device(device_name)
    timed = paired.measure("small", 1, steps, log_every=LOG_EVERY, device=device_name)
    print(paired.summary(timed), flush=True)
    counted = small_mlp(steps=100, warmup=0)
    x, y = synthetic_classification(counted.batch * counted.steps, counted.shape, counted.classes, device=device)
    return {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "work": counted.name, "batch": counted.batch, "steps": steps,
            "hand_steps_s": timed["hand_steps_s"], "engine_steps_s": timed["engine_steps_s"],
            "engine_vs_hand": timed["engine_vs_hand"], "paired": timed,
            "hand_dispatch": per_step(precision.hand_loop, counted, device, x, y),
            "engine_dispatch": per_step(precision.engine_loop, counted, device, x, y, log_every=LOG_EVERY)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # the host-bound regime, and quieter on a shared machine
    result = run(args.device, args.steps)
    for who in ("hand", "engine"):
        d = result[f"{who}_dispatch"]
        print(f"[hot_path] {who}: {result[f'{who}_steps_s']:.1f} steps/s, {d['ops_per_step']:.1f} ops and "
              f"{d['read_backs_per_step']:.2f} read-backs per step", flush=True)
    print(f"[hot_path] engine / hand = {result['engine_vs_hand']:.3f}")
    print(save(f"hot_path_{args.device}", result, args.out))


if __name__ == "__main__":
    main()
