"""Start-up: seconds from the command to the first training step, each measured in a fresh process.

    dtrain train   `dtrain train jobs/mlp_digits.yaml` as typed (2 workers, W&B off): no Ray runs, so the workers
                   are local processes
    dtrain ray     `dtrain train jobs/mlp_digits.yaml --ray`: through an embedded Ray, a cold start
    dtrain warm    `dtrain train jobs/mlp_digits.yaml` with a head kept by `dtrain up` (started once before the
                   repeats, not timed), which the command uses
    dtrain warm prestart
                   the same on a second head whose raylet prestarts a worker per CPU when a job starts, each
                   importing torch, ray.train.torch and dtrain's worker module (Ray's enable_worker_prestart and
                   preload_python_modules settings)
    preflight warm `dtrain preflight jobs/mlp_digits.yaml` on that head: seconds to its verdict (the whole command)
    hand ddp       a hand-written torch.multiprocessing DDP script (benchmarks/hand_ddp.py), 2 gloo processes
    deepspeed      `dtrain train jobs/mlp_digits_deepspeed.yaml` (ZeRO-2, bf16) as on a fresh machine: an empty
                   TORCH_EXTENSIONS_DIR, so any op DeepSpeed JIT-compiles is compiled within the measurement
    ray plain      a minimal Ray Train TorchTrainer script (benchmarks/ray_plain.py), 2 workers, same model and data
    engine         the engine alone: dtrain.launch.spawn.spawn_workers, 2 gloo processes, no Ray
    import         `python -c "import dtrain.cli"`, and `dtrain train`'s own imports before Ray starts

The first step's wall-clock time comes from metrics.jsonl (dtrain) or a stamp file (the plain script).

    python -m benchmarks.startup [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import median, save

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB = ["trainer.max_epochs=1", "trainer.log_every_n_steps=1", "logging.wandb.enabled=false", "logging.progress=false"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def _first_step(run_dir: Path) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "step":
            return record["time"]
    raise RuntimeError(f"{run_dir}: no step event")


def dtrain_train(tmp: Path, job: str = "mlp_digits.yaml", env: dict[str, str] | None = None,
                 options: tuple[str, ...] = ()) -> tuple[float, float]:
    started = time.time()
    _run([str(BIN / "dtrain"), "train", str(ROOT / "jobs" / job), "name=startup", f"runs_dir={tmp}", *JOB, *options],
         tmp, env)
    return _first_step(tmp / "startup") - started, time.time() - started


def dtrain_ray(tmp: Path) -> tuple[float, float]:
    return dtrain_train(tmp, options=("--ray",))


def deepspeed_fresh(tmp: Path) -> tuple[float, float]:
    fresh = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp / "torch_extensions")}  # empty: nothing compiled yet
    return dtrain_train(tmp, "mlp_digits_deepspeed.yaml", fresh)


HEAD_DIR = Path(tempfile.gettempdir()) / f"dtrain-bench-head-{os.getpid()}"
PRESTART = {"RAY_enable_worker_prestart": "1",
            "RAY_preload_python_modules": "torch,ray.train.torch,dtrain.launch.worker"}
HEADS = {"dtrain warm": (HEAD_DIR, {}), "preflight warm": (HEAD_DIR, {}),
         "dtrain warm prestart": (HEAD_DIR.with_name(HEAD_DIR.name + "-prestart"), PRESTART)}
"""The `dtrain up` heads of the warm runs: folder, and what the head's processes get in their environment."""


def _on_head(name: str) -> dict[str, str]:
    """The environment of a command that attaches to the head of warm run `name`."""
    return {**os.environ, "DTRAIN_LOCAL_HEAD_DIR": str(HEADS[name][0])}


def dtrain_warm(tmp: Path) -> tuple[float, float]:
    return dtrain_train(tmp, env=_on_head("dtrain warm"))


def dtrain_warm_prestart(tmp: Path) -> tuple[float, float]:
    return dtrain_train(tmp, env=_on_head("dtrain warm prestart"))


def preflight_warm(tmp: Path) -> tuple[float, float]:
    """`dtrain preflight` of the job on the `dtrain up` head: seconds from the command to its verdict (both values)."""
    started = time.time()
    _run([str(BIN / "dtrain"), "preflight", str(ROOT / "jobs" / "mlp_digits.yaml"), f"runs_dir={tmp}",
          "logging.wandb.enabled=false"], tmp, _on_head("preflight warm"))
    return time.time() - started, time.time() - started


def hand_ddp(tmp: Path) -> tuple[float, float]:
    started = time.time()
    stamp = tmp / "first_step"
    _run([sys.executable, "-m", "benchmarks.hand_ddp", str(stamp)], ROOT)
    return float(stamp.read_text()) - started, time.time() - started


def ray_plain(tmp: Path) -> tuple[float, float]:
    started = time.time()
    stamp = tmp / "first_step"
    _run([sys.executable, "-m", "benchmarks.ray_plain", str(stamp)], ROOT)
    return float(stamp.read_text()) - started, time.time() - started


def engine(tmp: Path) -> tuple[float, float]:
    started = time.time()
    code = ("import sys; from benchmarks.common import mlp_job; from dtrain.launch.spawn import spawn_workers; "
            "spawn_workers(mlp_job([256, 128], 32, 1, log_every_n_steps=1), sys.argv[1])")
    _run([sys.executable, "-c", code, str(tmp)], ROOT)
    return _first_step(tmp) - started, time.time() - started


def imports(tmp: Path) -> tuple[float, float]:
    """Seconds to import the CLI, and to import what `dtrain train` needs before Ray starts (its launch module)."""
    def timed(code: str) -> float:
        started = time.time()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
        return time.time() - started
    return timed("import dtrain.cli"), timed("import dtrain.cli, dtrain.launch.train, ray, ray.train.torch")


RUNS = {"dtrain train": dtrain_train, "dtrain warm": dtrain_warm, "dtrain warm prestart": dtrain_warm_prestart,
        "dtrain ray": dtrain_ray,
        "preflight warm": preflight_warm, "hand ddp": hand_ddp, "deepspeed": deepspeed_fresh, "ray plain": ray_plain,
        "engine": engine, "import": imports}


def run(names: list[str], repeats: int) -> dict[str, Any]:
    """Interleaved fresh-process runs; median seconds to the first step and to the end of the 1-epoch run."""
    raw: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    heads = {folder: {**_on_head(name), **extra} for name, (folder, extra) in HEADS.items() if name in names}
    try:
        for env in heads.values():
            _run([str(BIN / "dtrain"), "up"], ROOT, env)
        _repeat(names, repeats, raw)
    finally:
        for env in heads.values():
            _run([str(BIN / "dtrain"), "down"], ROOT, env)
    return {"raw": raw, "first_step_s": {n: median([a for a, _ in v]) for n, v in raw.items()},
            "total_s": {n: median([b for _, b in v]) for n, v in raw.items()},
            "note": "import row: first_step_s = import dtrain.cli, total_s = + dtrain.launch.train, ray, ray.train"}


def _repeat(names: list[str], repeats: int, raw: dict[str, list[tuple[float, float]]]) -> None:
    for rep in range(repeats):
        for name in names:
            with tempfile.TemporaryDirectory() as tmp:
                raw[name].append(RUNS[name](Path(tmp)))
            print(f"[startup] repeat {rep} {name}: {raw[name][-1][0]:.1f} s, {raw[name][-1][1]:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="import,hand ddp,engine,dtrain train,ray plain,dtrain ray,dtrain warm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.runs.split(","), args.repeats)
    print(json.dumps(result["first_step_s"]))
    print(save("startup", result, args.out))


if __name__ == "__main__":
    main()
