"""`make bench`: run the benchmarks (each in its own process) and print one table of what they measured.

    python -m benchmarks.run [--sections overhead,ddpflags,startup,zero,compile,precision,hotpath,trackers,
                              checkpoints,checkpointsray,datamemory,datascale,objstore,gpu] [--quick] [--table-only]

Results go to benchmarks/results/<name>.json (with the machine's details); --table-only prints the table from the
JSON files already there (e.g. ones fetched from a GPU machine into --results DIR).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, machine, median

QUICK = {"overhead": ["--repeats", "1", "--epochs", "3", "--warmup", "5", "--runners", "hand,engine",
                      "--paired-steps", "300"],
         "startup": ["--repeats", "1", "--runs", "import,engine"],
         "zero": ["--epochs", "2", "--warmup", "5", "--hidden", "64"],
         "precision": ["--quick", "--repeats", "1"], "hotpath": ["--steps", "300"], "ddpflags": ["--steps", "300"],
         "trackers": ["--rounds", "3", "--block", "20", "--warmup", "1"], "gpu": ["--quick", "--repeats", "1"],
         "checkpoints": ["--repeats", "1", "--epochs", "3", "--alternate-epochs", "6"],
         "checkpointsray": ["--launcher", "ray", "--repeats", "1", "--epochs", "3",
                            "--modes", "off,training_thread,background"], "datamemory": ["--rows", "100000"],
         "datascale": ["--rows", "100000", "--speed-rows", "100000", "--pairs", "1", "--steps", "200",
                       "--log-every", "50"],
         "compile": ["--steps", "60", "--warmup", "10", "--hidden", "64"],
         "objstore": ["--repeats", "1", "--train-repeats", "1"]}
FULL = {"overhead": ["--boundary"], "checkpoints": ["--epochs", "30", "--repeats", "10"],
        "checkpointsray": ["--launcher", "ray", "--epochs", "30"]}
MODULES = {"overhead": "benchmarks.overhead", "ddpflags": "benchmarks.ddp_flags", "startup": "benchmarks.startup",
           "zero": "benchmarks.zero_memory", "compile": "benchmarks.compile_speed",
           "precision": "benchmarks.precision", "hotpath": "benchmarks.hot_path", "trackers": "benchmarks.trackers",
           "checkpoints": "benchmarks.checkpoint_cost", "checkpointsray": "benchmarks.checkpoint_cost",
           "datamemory": "benchmarks.data_memory", "gpu": "benchmarks.gpu",
           "datascale": "benchmarks.data_scale",
           "objstore": "benchmarks.objstore"}


def _load(folder: Path, name: str) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(folder: Path) -> list[tuple[str, str, str, str]]:
    """(benchmark, configuration, measurement, relative) rows from the result files in folder."""
    rows: list[tuple[str, str, str, str]] = []
    if r := _load(folder, "overhead"):
        for name, v in r["median_steps_s"].items():
            rows.append(("overhead", name, f"{v:.1f} steps/s", f"{r['ratio_to_hand'].get(name, 0):.3f} x hand"))
        if p := r.get("paired"):
            rows.append(("overhead", f"engine in turns with hand ({p['world']} procs)",
                         f"{p['engine_steps_s']:.1f} vs {p['hand_steps_s']:.1f} steps/s",
                         f"{p['engine_vs_hand']:.3f} x hand, {p['engine_vs_hand_metrics']:.3f} x hand+metrics"))
        for cores in r.get("ray_cores_busy", [])[:1]:
            rows.append(("overhead", "ray: cores busy (steady state)", ", ".join(f"{k} {v:.2f}" for k, v in
                                                                              sorted(cores.items())), ""))
        if b := r.get("ray_epoch_boundary"):
            rows.append(("overhead", "ray epoch end", f"{b['step_across_epoch_end_ms']:.1f} ms across an epoch end",
                         f"{b['step_inside_epoch_ms']:.1f} ms inside an epoch"))
    if r := _load(folder, "objstore"):
        for name, times in r["persist_s"].items():
            local, s3 = (sorted(times[w]) for w in ("local", "s3"))
            rows.append(("objstore", f"persist a {r['checkpoint_mb'][name]:.1f} MB checkpoint ({name})",
                         f"local {local[len(local) // 2]:.3f} s, s3 {s3[len(s3) // 2]:.3f} s",
                         f"s3 range {s3[0]:.3f}-{s3[-1]:.3f} s"))
        if ratio := r.get("train_s3_vs_local"):
            rows.append(("objstore", "dtrain train mlp, checkpoint every 5 steps",
                         f"s3 {sorted(r['train_steps_s']['s3'])[len(ratio) // 2]:.1f} vs local "
                         f"{sorted(r['train_steps_s']['local'])[len(ratio) // 2]:.1f} steps/s",
                         f"{sorted(ratio)[len(ratio) // 2]:.3f} x local (range {min(ratio):.3f}-{max(ratio):.3f})"))
    if r := _load(folder, "ddp_flags"):
        for name, speed in r["speed_vs_default"].items():
            lo, hi = r["speed_vs_default_ci95"][name]
            rows.append(("ddp options", f"{name} ({r['world']} procs, in turns)", f"{r['steps_s'][name]:.1f} steps/s",
                         f"{speed:.3f} x default DDP ({lo:.3f}-{hi:.3f})"))
    if r := _load(folder, "startup"):
        for name, v in r["first_step_s"].items():
            rows.append(("startup", name, f"{v:.1f} s to first step", f"{r['total_s'][name]:.1f} s total"))
    if r := _load(folder, "zero_memory"):
        for name, row in r["rows"].items():
            m = row["per_rank"][0]
            mem = f"p/g/o {m['param_bytes'] / 2**20:.1f}/{m['grad_bytes'] / 2**20:.1f}/" \
                  f"{m['optimizer_state_bytes'] / 2**20:.1f} MiB"
            rows.append(("zero", name, f"{mem}, {row['steps_s']:.1f} steps/s", f"{row['vs_ddp']:.2f} x ddp bytes"))
    if r := _load(folder, "compile_speed"):
        for name, row in r["rows"].items():
            extra = (f"{row['speedup']:.2f} x eager, compile {row['compile_s']:.0f} s, pays after "
                     f"{row['break_even_steps'] or float('inf'):.0f} steps") if "speedup" in row else ""
            rows.append(("compile", name, f"{row['steps_s']:.1f} steps/s", extra))
    for name in ("precision_cpu", "gpu"):
        r = _load(folder, name)
        if not r:
            continue
        where = r.get("device") or r["machine"].get("cpu", "cpu")
        for p in r.get("precision", r.get("rows", [])):
            mfu = f", MFU {p['engine_mfu']:.0%}" if "engine_mfu" in p else ""
            rows.append((f"precision ({where})", f"{p['work']} {p['precision']}",
                         f"{p['engine_steps_s']:.1f} steps/s, {p['engine_tflops']:.2f} TFLOP/s{mfu}",
                         f"{p['speedup_vs_fp32']:.2f} x fp32, {p['engine_vs_hand']:.3f} x hand"))
    gpu = _load(folder, "gpu") or {}
    for r in (_load(folder, "hot_path_cpu"), gpu.get("small_mlp")):
        if r:
            e = r.get("engine_dispatch")
            counts = f", {e['ops_per_step']:.0f} ops + {e['read_backs_per_step']:.2f} read-backs per step" if e else ""
            vs_metrics = f", {r['paired']['engine_vs_hand_metrics']:.3f} x hand+metrics" if "paired" in r else ""
            rows.append((f"hot path ({r.get('device', gpu.get('device'))})", "small mlp fp32",
                         f"{r['engine_steps_s']:.0f} steps/s{counts}", f"{r['engine_vs_hand']:.3f} x hand{vs_metrics}"))
    if r := _load(folder, "trackers"):
        for name, q in r["ratios"].items():
            rows.append(("trackers", f"{name} (in turns with off, 1 proc)", f"{q['speed_vs_off']:.4f} x off",
                         f"per-round median {q['median']:.4f} ({q['q1']:.4f}-{q['q3']:.4f})"))
    for name, launcher in (("checkpoint_cost", "2 procs"), ("checkpoint_cost_ray", "dtrain train, 2 workers")):
        if r := _load(folder, name):
            steady = "steady_ratios_vs_off" in r  # result files from before it was measured have the loop's only
            for mode, ratios in r["steady_ratios_vs_off" if steady else "ratios_vs_off"].items():
                rows.append(("checkpoints", f"{mode} (every epoch, {launcher}, in turns{', steady' if steady else ''})",
                             f"{median(ratios):.3f} x off", f"range {min(ratios):.3f}-{max(ratios):.3f}"))
            if ratios := r.get("alternating_ratios"):
                rows.append(("checkpoints", f"background, every other epoch ({launcher}): epochs with vs without",
                             f"{median(ratios):.3f} x without", f"range {min(ratios):.3f}-{max(ratios):.3f}"))
    if r := _load(folder, "data_memory"):
        for run in r["runs"]:
            rows.append(("in-memory data", f"{run['rows']:,} rows x 64 float32, 2 workers",
                         f"driver {run['driver_uss_x']:.2f}x, worker {run['worker_uss_x']:.2f}x (USS)",
                         f"RSS: driver {run['driver_x']:.2f}x, worker {run['worker_x']:.2f}x"))
    if r := _load(folder, "data_scale"):
        for run in r["runs"]:
            peaks = f"driver {run['driver_peak_mib']:,.0f} MiB, worker {run['worker_peak_mib']:,.0f} MiB (RSS)"
            rows.append((f"data {run['path']}", f"{run['rows']:,} rows x 64 float32, 2 workers",
                         run["failed"] or peaks, "" if run["failed"] else f"first step {run['first_step_s']:.0f} s"))
        if t := r.get("throughput"):
            ratios = t["stream_vs_memory"]
            rows.append(("data stream vs memory", f"{t['rows']:,} rows, samples/s in turns",
                         f"{sorted(ratios)[len(ratios) // 2]:.3f} x in-memory",
                         f"range {min(ratios):.3f}-{max(ratios):.3f}"))
    return rows


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    header = ("benchmark", "configuration", "measured", "relative")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="overhead,ddpflags,startup,zero,compile,precision,hotpath,trackers,"
                                              "checkpoints,checkpointsray,datamemory,datascale,objstore,gpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: checks that all runs")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    folder = Path(args.results)
    failed = []
    if not args.table_only:
        import torch

        for section in args.sections.split(","):
            if section == "gpu" and not torch.cuda.is_available():
                print("[bench] gpu: skipped (no CUDA GPU here)", flush=True)
                continue
            extra = QUICK[section] if args.quick else FULL.get(section, [])
            print(f"[bench] {section} ...", flush=True)
            cmd = [sys.executable, "-m", MODULES[section], "--out", str(folder), *extra]
            if subprocess.run(cmd).returncode != 0:
                failed.append(section)
    print("\nmachine:", json.dumps(machine()))
    print_table(table(folder))
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
