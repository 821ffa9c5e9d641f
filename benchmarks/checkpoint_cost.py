"""What checkpoints cost the training loop: the `make train` job (MLP 64-256-128-10 on digits, 2 gloo processes,
a checkpoint every epoch) with checkpoints off, written on the training thread, and written in the background,
taking turns in one run (mode order rotating each repeat). Reported per mode, as its ratio to checkpoints off (median
and spread over the repeats): the steady speed (from the first epoch's end to the last one's: every epoch there
takes, writes and publishes a checkpoint) and the whole loop (which also waits for the last write, once per run).
Mode alternate (a checkpoint every other epoch, in the background, --alternate-epochs long) is measured within each
run instead, as the median epoch without a checkpoint over the median epoch with one (an epoch "with" is the one in
which the checkpoint taken at the previous epoch's end is written and published): its epochs alternate within
seconds, so a machine whose speed drifts between runs moves both alike.
--hidden sets the MLP's hidden layers (2048,2048,2048: a 100 MB checkpoint with Adam's state), --workers the number
of processes (1 on a 2-core machine: a core to spare for the background write). --launcher ray runs each as users
run it, `dtrain train` (a fresh embedded Ray each time), where each checkpoint is also handed to Ray Train
(ray.train.report) and copied into the run folder by it; the default, local, runs the engine's ranks without Ray.

    python -m benchmarks.checkpoint_cost [--repeats 5] [--epochs 8] [--hidden 256,128] [--workers 2]
                                         [--modes off,training_thread,background,alternate] [--alternate-epochs 100]
                                         [--launcher local|ray] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import median, save
from dtrain.config import load_job, to_dict

ROOT = Path(__file__).resolve().parents[1]
MODES = {"off": ["checkpoint.every_n_epochs=0"],
         "training_thread": ["checkpoint.every_n_epochs=1", "checkpoint.background=false"],
         "background": ["checkpoint.every_n_epochs=1", "checkpoint.background=true"],
         "alternate": ["checkpoint.every_n_epochs=2", "checkpoint.background=true"]}
HIDDEN = "256,128"
"""The `make train` job's hidden layers."""


def run(mode: str, epochs: int, hidden: str, workers: int, tmp: str,
        launcher: str = "local") -> tuple[float, list[tuple[int, float]]]:
    """The loop's wall time (summary.wall_time_s) of one run, and its epoch records' (epoch, time)."""
    run_dir = Path(tmp) / f"ckpt_{mode}"
    overrides = [f"runs_dir={tmp}", f"name={run_dir.name}", f"trainer.max_epochs={epochs}",
                 f"trainer.num_workers={workers}", "trainer.early_stopping.monitor=null", f"model.hidden=[{hidden}]",
                 "logging.progress=false", "logging.wandb.enabled=false", *MODES[mode]]
    if launcher == "ray":
        subprocess.run([sys.executable, "-m", "dtrain", "train", str(ROOT / "jobs" / "mlp_digits.yaml"), *overrides,
                        "--ray"],
                       check=True, cwd=ROOT, env=os.environ | {"WANDB_MODE": "offline"}, stdout=subprocess.DEVNULL)
        wall = json.loads((run_dir / "summary.json").read_text())["wall_time_s"]
    else:
        from dtrain.launch.spawn import spawn_workers

        job = load_job(ROOT / "jobs" / "mlp_digits.yaml", overrides)
        wall = spawn_workers(to_dict(job), run_dir, world=workers)["wall_time_s"]
    with open(run_dir / "metrics.jsonl") as f:
        ends = [(record["epoch"], record["time"]) for record in map(json.loads, f) if record.get("event") == "epoch"]
    return wall, ends


def alternating_ratio(ends: list[tuple[int, float]]) -> float:
    """In a run with a checkpoint at the end of every even epoch: the median time of an epoch without a checkpoint
    over that of one with (the first two epochs, warming up, left out)."""
    with_one, without = [], []
    for (before, t0), (epoch, t1) in zip(ends, ends[1:], strict=False):
        if epoch > 2:
            (with_one if before % 2 == 0 else without).append(t1 - t0)
    return median(without) / median(with_one)


def _speed_vs_off(seconds: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per mode, each repeat's speed relative to the checkpoints-off run of the same repeat."""
    return {m: [off / t for off, t in zip(seconds["off"], seconds[m], strict=True)] for m in seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--alternate-epochs", type=int, default=100, help="the alternate mode's run length")
    parser.add_argument("--hidden", default=HIDDEN, help="the MLP's hidden layer widths")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES), help="of " + ", ".join(MODES) + " (off is needed)")
    parser.add_argument("--launcher", choices=["local", "ray"], default="local",
                        help="local: the engine's ranks without Ray; ray: `dtrain train`")
    parser.add_argument("--out", default=None, help="the results folder (default benchmarks/results)")
    args = parser.parse_args()
    names = args.modes.split(",")
    if "off" not in names or not set(names) <= set(MODES):
        parser.error(f"--modes: a comma-separated list of {', '.join(MODES)} that includes off; got {args.modes}")
    if "alternate" in names and args.alternate_epochs < 6:
        parser.error(f"--alternate-epochs: at least 6; got {args.alternate_epochs}")
    times: dict[str, list[float]] = {m: [] for m in names if m != "alternate"}
    steady: dict[str, list[float]] = {m: [] for m in names if m != "alternate"}
    alternating: list[float] = []
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for mode in order:
            with tempfile.TemporaryDirectory() as tmp:
                if mode == "alternate":
                    _, ends = run(mode, args.alternate_epochs, args.hidden, args.workers, tmp, args.launcher)
                    alternating.append(alternating_ratio(ends))
                    continue
                wall, ends = run(mode, args.epochs, args.hidden, args.workers, tmp, args.launcher)
                times[mode].append(wall)
                steady[mode].append(ends[-1][1] - ends[0][1])
    ratios, steady_ratios = _speed_vs_off(times), _speed_vs_off(steady)
    if alternating:
        print(f"{'alternate':16s} epoch speed with a checkpoint vs without, in each run: {median(alternating):.3f} "
              f"(range {min(alternating):.3f}-{max(alternating):.3f})")
    for m in times:
        print(f"{m:16s} steady speed vs off {median(steady_ratios[m]):.3f} (range {min(steady_ratios[m]):.3f}-"
              f"{max(steady_ratios[m]):.3f}); loop {median(times[m]):.2f} s, speed vs off {median(ratios[m]):.3f} "
              f"(range {min(ratios[m]):.3f}-{max(ratios[m]):.3f})")
    name = "checkpoint_cost" + ("" if args.hidden == HIDDEN else f"_{args.hidden.replace(',', 'x')}") + (
        "" if args.workers == 2 else f"_{args.workers}w") + ("" if args.launcher == "local" else f"_{args.launcher}")
    saved = save(name, {"times": times, "steady_s": steady, "ratios_vs_off": ratios,
                        "steady_ratios_vs_off": steady_ratios,
                        "alternating_ratios": alternating, "epochs": args.epochs,
                        "alternate_epochs": args.alternate_epochs, "hidden": args.hidden,
                        "workers": args.workers, "launcher": args.launcher},
                 Path(args.out) if args.out else None)
    print(f"results: {saved}")


if __name__ == "__main__":
    main()
