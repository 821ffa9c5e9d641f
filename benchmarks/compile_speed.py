"""torch.compile: steady steps/s with and without trainer.compile, and what compiling costs up front, so a user can
see after how many steps it pays.

Each setting trains the catalog MLP on digits (fp32, Adam) for a fixed number of steps in 2 local gloo processes
(dtrain.launch.spawn), eager and compiled, with a fresh inductor cache for the compiled run (TORCHINDUCTOR_CACHE_DIR,
so the compile is timed cold, as a first run on a machine pays it). Steady rate: from the step stamps rank 0 writes
to metrics.jsonl, warm-up excluded. Compile cost: the compiled run's wall time beyond its steady rate, minus the
same for the eager run (start-up and the first steps' allocation are in both).

    python -m benchmarks.compile_speed [--hidden 1024,1024] [--steps 300] [--strategies ddp,fsdp]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import mlp_job, save
from benchmarks.overhead import _metrics_rate


def run_one(job: dict[str, Any], warmup: int, steps: int) -> dict[str, float]:
    """Wall time, steady steps/s and the time not explained by the steady rate, of one 2-process run."""
    from dtrain.launch.spawn import spawn_workers

    with tempfile.TemporaryDirectory() as tmp:
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # cold: nothing compiled before
        try:
            started = time.perf_counter()
            spawn_workers(job, Path(tmp) / "run", world=2)
            wall = time.perf_counter() - started
        finally:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
            if cache is not None:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        rate = _metrics_rate(Path(tmp) / "run", warmup)
    return {"wall_s": wall, "steps_s": rate, "fixed_s": wall - steps / rate}


def run(hidden: list[int], batch: int, steps: int, warmup: int, strategies: list[str]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for strategy in strategies:
        for compiled in (False, True):
            job = mlp_job(hidden, batch, 10_000, log_every_n_steps=5, strategy=strategy, max_steps=steps,
                          compile=compiled)
            name = f"{strategy}{'_compiled' if compiled else ''}"
            rows[name] = run_one(job, warmup, steps)
            print(f"[compile] {name}: {rows[name]}", flush=True)
        eager, fast = rows[strategy], rows[f"{strategy}_compiled"]
        cost = fast["fixed_s"] - eager["fixed_s"]
        saved_per_step = 1 / eager["steps_s"] - 1 / fast["steps_s"]
        fast["speedup"] = fast["steps_s"] / eager["steps_s"]
        fast["compile_s"] = cost
        fast["break_even_steps"] = cost / saved_per_step if saved_per_step > 0 else None
    return {"setting": {"model": f"mlp hidden={hidden}", "data": "digits", "batch_per_rank": batch, "ranks": 2,
                        "precision": "fp32", "optimizer": "adam", "steps": steps, "compile": "inductor, default "
                        "mode (the whole model under ddp, each Linear under fsdp)"}, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="1024,1024")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--strategies", default="ddp,fsdp")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run([int(h) for h in args.hidden.split(",")], args.batch, args.steps, args.warmup,
                 args.strategies.split(","))
    print(save("compile_speed", result, args.out))


if __name__ == "__main__":
    main()
