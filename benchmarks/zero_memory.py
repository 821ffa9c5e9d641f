"""Sharding: per-rank parameter / gradient / optimizer-state bytes and steps/s, DDP vs ZeRO 0-3 vs FSDP2, 2 ranks.

Each strategy trains the same catalog MLP on digits in 2 local gloo processes (dtrain.launch.spawn, fp32, Adam).
DeepSpeed's and FSDP's per-rank bytes come from the StateBytes callback (dtrain.engine.callbacks: what the rank holds
at its first optimizer step); DDP's are counted on a replica after one Adam step (every DDP rank holds all of it).

    python -m benchmarks.zero_memory [--hidden 1024,1024] [--epochs 3] [--only ddp,zero3,fsdp]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median, mlp_job, save
from benchmarks.overhead import _metrics_rate, _setup


def ddp_bytes(job: dict[str, Any]) -> dict[str, int]:
    """What one DDP rank holds: full fp32 weights, full gradients, Adam's two moments (after one step)."""
    _, data, model = _setup(job)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(tuple(t[:8] for t in data.train)).loss.backward()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    opt.step()
    state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                if torch.is_tensor(v) and v.dim() > 0)  # the moments; Adam's scalar step counters are noise
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"param_bytes": params, "grad_bytes": grads, "optimizer_state_bytes": state,
            "num_params": sum(p.numel() for p in model.parameters())}


def run_one(job: dict[str, Any], warmup: int) -> tuple[float, list[dict[str, Any]]]:
    """(steady steps/s, per-rank memory records) of one 2-process run."""
    from dtrain.engine.callbacks import StateBytes
    from dtrain.launch.spawn import spawn_workers

    with tempfile.TemporaryDirectory() as tmp:
        spawn_workers(job, tmp, world=2, callbacks=[StateBytes(Path(tmp) / "memory")])
        files = sorted((Path(tmp) / "memory").glob("rank*.json"))
        return _metrics_rate(Path(tmp), warmup), [json.loads(f.read_text()) for f in files]


def run(hidden: list[int], batch: int, epochs: int, warmup: int, repeats: int,
        only: list[str] | None = None) -> dict[str, Any]:
    """DDP, ZeRO 0-3 and FSDP2 (resharding after forward or not) side by side; memory per rank (rank 0) and median
    steps/s over repeats. only: the names of the runs to make (all by default)."""
    base = mlp_job(hidden, batch, epochs, log_every_n_steps=5)
    jobs = {"ddp": base}
    for stage in range(4):
        jobs[f"zero{stage}"] = mlp_job(hidden, batch, epochs, log_every_n_steps=5, strategy="deepspeed",
                                       deepspeed={"zero_stage": stage})
    for name, reshard in (("fsdp", True), ("fsdp_keep", False)):
        jobs[name] = mlp_job(hidden, batch, epochs, log_every_n_steps=5, strategy="fsdp",
                             fsdp={"reshard_after_forward": reshard})
    jobs = {name: job for name, job in jobs.items() if not only or name in only}
    rows: dict[str, dict[str, Any]] = {}
    rates: dict[str, list[float]] = {name: [] for name in jobs}
    for rep in range(repeats):
        for name, job in jobs.items():
            rate, memory = run_one(job, warmup)
            rates[name].append(rate)
            rows.setdefault(name, {"per_rank": memory or [ddp_bytes(job)]})
            print(f"[zero] repeat {rep} {name}: {rate:.1f} steps/s {rows[name]['per_rank'][0]}", flush=True)
    for name, row in rows.items():
        row["steps_s"] = median(rates[name])
        row["steps_s_all"] = rates[name]
        r0 = row["per_rank"][0]
        row["total_bytes"] = r0["param_bytes"] + r0["grad_bytes"] + r0["optimizer_state_bytes"]
    ddp = rows["ddp"]["per_rank"][0] if "ddp" in rows else ddp_bytes(base)
    ddp_total = ddp["param_bytes"] + ddp["grad_bytes"] + ddp["optimizer_state_bytes"]
    for row in rows.values():
        row["vs_ddp"] = row["total_bytes"] / ddp_total
    return {"setting": {"model": f"mlp hidden={hidden}", "data": "digits", "batch_per_rank": batch, "ranks": 2,
                        "precision": "fp32", "optimizer": "adam", "epochs": epochs}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="1024,1024")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default="", help="comma-separated runs: ddp, zero0-3, fsdp, fsdp_keep")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run([int(h) for h in args.hidden.split(",")], args.batch, args.epochs, args.warmup, args.repeats,
                 [n for n in args.only.split(",") if n])
    print(save("zero_memory", result, args.out))


if __name__ == "__main__":
    main()
