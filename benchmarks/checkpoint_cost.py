"""What checkpoints cost the training loop: the `make train` job (MLP 64-256-128-10 on digits, 2 gloo processes,
a checkpoint every epoch) with checkpoints off, written on the training thread, and written in the background,
taking turns in one run (mode order rotating each repeat). Reported: the loop's wall time per mode and its ratio
to checkpoints off (median and spread over the repeats).

    python -m benchmarks.checkpoint_cost [--repeats 5] [--epochs 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.common import median, save
from dtrain.config import load_job, to_dict

ROOT = Path(__file__).resolve().parents[1]
MODES = {"off": ["checkpoint.every_n_epochs=0"],
         "training_thread": ["checkpoint.every_n_epochs=1", "checkpoint.background=false"],
         "background": ["checkpoint.every_n_epochs=1", "checkpoint.background=true"]}


def run(mode: str, epochs: int, tmp: str) -> float:
    """The loop's wall time (summary.wall_time_s) of one run."""
    from dtrain.launch.spawn import spawn_workers

    job = load_job(ROOT / "jobs" / "mlp_digits.yaml", [
        f"runs_dir={tmp}", f"name={mode}", f"trainer.max_epochs={epochs}", "trainer.early_stopping.monitor=null",
        "logging.progress=false", "logging.wandb.enabled=false", *MODES[mode]])
    return spawn_workers(to_dict(job), Path(tmp) / mode, world=2)["wall_time_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    names = list(MODES)
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for mode in order:
            with tempfile.TemporaryDirectory() as tmp:
                times[mode].append(run(mode, args.epochs, tmp))
    ratios = {m: [off / t for off, t in zip(times["off"], times[m], strict=True)] for m in MODES}
    for m in MODES:
        print(f"{m:16s} loop {median(times[m]):.2f} s, speed vs off {median(ratios[m]):.3f} "
              f"(range {min(ratios[m]):.3f}-{max(ratios[m]):.3f})")
    print(f"results: {save('checkpoint_cost', {'times': times, 'ratios_vs_off': ratios, 'epochs': args.epochs})}")


if __name__ == "__main__":
    main()
