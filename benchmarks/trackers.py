"""Cost of each tracker sink and of system metrics on the benchmark job, measured in turns in one process.

Whole runs on a shared machine drift by 10-15 %, far more than the 1 % a sink may cost. Here one engine (`loop.fit`
on the `make bench` overhead job, as a `dtrain train` worker runs it) trains, and its log callable switches the
configuration every --block steps, in rotation: `off` (metrics.jsonl alone, what every run writes), `tensorboard`,
`mlflow` (to an `mlflow server` this script starts on 127.0.0.1, SQLite backend) and `system` (system metrics
gathered at each logged step; the sampling thread runs throughout, so its own cost is measured apart, as the CPU
time one sample takes). Each configuration's blocks sit next to `off` blocks, so slow phases of the machine hit all
alike. Reported: total time per configuration over total `off` time, and the median and quartiles of the per-round
ratios; the first --warmup rounds are dropped.

    python -m benchmarks.trackers [--rounds 14] [--block 200] [--log-every 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import median, mlp_job, save

CONFIGS = ("off", "tensorboard", "mlflow", "system")


class Rotation:
    """The engine's log callable: hands each record to the current configuration's sinks and, every `block`
    steps, stamps the block's time and moves on to the next configuration."""

    def __init__(self, sinks: dict[str, list[Any]], block: int) -> None:
        self.sinks, self.block = sinks, block
        self.times: dict[str, list[float]] = {name: [] for name in CONFIGS}
        self.turn, self.started = 0, time.perf_counter()

    @property
    def current(self) -> str:
        return CONFIGS[self.turn % len(CONFIGS)]

    def __call__(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), **record}
        for sink in self.sinks[self.current]:
            sink.log(record)
        if record.get("event") == "step" and record["step"] % self.block == 0:
            now = time.perf_counter()
            self.times[self.current].append(now - self.started)
            self.turn, self.started = self.turn + 1, now


class SystemWhenOn:
    """System metrics as the loop gathers them, only during `system` blocks."""

    def __init__(self, monitor: Any, rotation: Rotation) -> None:
        self.monitor, self.rotation = monitor, rotation

    def on_setup(self, *args: Any) -> None:
        pass

    def on_step_end(self, *args: Any) -> None:
        pass

    def log_values(self) -> dict[str, float]:
        return self.monitor.log_values() if self.rotation.current == "system" else {}


def _sinks(job: dict[str, Any], folder: Path, uri: str) -> dict[str, list[Any]]:
    from dtrain.tracking import JsonlSink
    from dtrain.tracking.mlflow_sink import MlflowSink, mlflow_settings
    from dtrain.tracking.tensorboard_sink import TensorBoardSink

    for name in CONFIGS:
        (folder / name).mkdir()
    cfg = mlflow_settings(job | {"logging": {"mlflow": {"enabled": "true", "tracking_uri": uri}}})
    return {"off": [JsonlSink(folder / "off", echo=False)],
            "tensorboard": [JsonlSink(folder / "tensorboard", echo=False),
                            TensorBoardSink(folder / "tensorboard" / "tb", job)],
            "mlflow": [JsonlSink(folder / "mlflow", echo=False), MlflowSink(folder / "mlflow", job, cfg)],
            "system": [JsonlSink(folder / "system", echo=False)]}


def _cpu_per_record(job: dict[str, Any], folder: Path, uri: str, record: dict[str, Any], n: int) -> dict[str, float]:
    """CPU milliseconds of this process (all its threads: the writers' and MLflow's sending threads included) per
    logged step record, for fresh sinks of each configuration; flushed and closed inside the measurement."""
    out = {}
    for name, sinks in _sinks(job, folder, uri).items():
        if name == "system":  # its sinks are metrics.jsonl's: its cost is the sampling thread, measured apart
            continue
        started = time.process_time()
        for i in range(n):
            for sink in sinks:
                sink.log(record | {"step": (i + 1) * 10})
        for sink in sinks:
            sink.finish(False)
        out[name] = 1e3 * (time.process_time() - started) / n
    return out


def _ratios(times: dict[str, list[float]], warmup: int) -> dict[str, dict[str, float]]:
    off = times["off"][warmup:]
    out = {}
    for name in CONFIGS[1:]:
        mine = times[name][warmup:len(off) + warmup]
        rounds = sorted(o / m for o, m in zip(off, mine, strict=False))  # speed relative to off: < 1 is slower
        out[name] = {"speed_vs_off": sum(off[:len(mine)]) / sum(mine), "median": median(rounds),
                     "q1": rounds[len(rounds) // 4], "q3": rounds[(3 * len(rounds)) // 4]}
    return out


def run(rounds: int, block: int, log_every: int, warmup: int) -> dict[str, Any]:
    """Train the overhead job for rounds x configurations x block steps with the rotation; returns the result."""
    from dtrain.config import to_objects
    from dtrain.engine.loop import RunContext, fit
    from dtrain.launch.sysmetrics import SystemMonitor
    from dtrain.launch.worker import build_worker
    from tests.mlflow_server import running_mlflow_server

    torch.set_num_threads(1)
    steps = rounds * len(CONFIGS) * block
    job = mlp_job([1024, 1024], 64, 10**6, num_workers=1, log_every_n_steps=log_every, max_steps=steps)
    with tempfile.TemporaryDirectory() as tmp, running_mlflow_server(Path(tmp)) as uri:
        sinks = _sinks(job, Path(tmp), uri)
        rotation = Rotation(sinks, block)
        with SystemMonitor(1.0) as monitor:
            worker = build_worker(to_objects(job), torch.device("cpu"))
            ctx = RunContext(0, 1, lambda m, f: None, rotation, callbacks=[SystemWhenOn(monitor, rotation)])
            fit(worker.model, worker.loaders, worker.strategy, worker.loop, ctx)
            started = time.process_time()
            for _ in range(200):
                monitor._sample()
            sample_cpu_s = (time.process_time() - started) / 200
        for sink in (s for group in sinks.values() for s in group):
            sink.finish(False)
        last = next(r for r in map(json.loads, (Path(tmp) / "off" / "metrics.jsonl").read_text().splitlines()[::-1])
                    if r["event"] == "step")
        (Path(tmp) / "direct").mkdir()
        cpu_ms = _cpu_per_record(job, Path(tmp) / "direct", uri, last, 2000)
    per_step_ms = 1e3 * sum(rotation.times["off"][warmup:]) / (block * len(rotation.times["off"][warmup:]))
    return {"rounds": rounds, "block": block, "log_every": log_every, "warmup_rounds": warmup,
            "off_step_ms": per_step_ms, "ratios": _ratios(rotation.times, warmup), "times": rotation.times,
            "cpu_ms_per_logged_step": cpu_ms,
            "cpu_share_of_a_logging_window": {k: (v - cpu_ms["off"]) / (log_every * per_step_ms)
                                              for k, v in cpu_ms.items() if k != "off"},
            "system_sample_cpu_ms": 1e3 * sample_cpu_s,
            "system_thread_core_share_at_1s": sample_cpu_s / 1.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=14)
    parser.add_argument("--block", type=int, default=200)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args.rounds, args.block, args.log_every, args.warmup)
    for name, r in result["ratios"].items():
        print(f"[trackers] {name}: {r['speed_vs_off']:.4f} x off (per-round median {r['median']:.4f}, "
              f"quartiles {r['q1']:.4f}-{r['q3']:.4f})", flush=True)
    for name, share in result["cpu_share_of_a_logging_window"].items():
        print(f"[trackers] {name}: {result['cpu_ms_per_logged_step'][name]:.3f} ms CPU per logged step "
              f"(metrics.jsonl alone: {result['cpu_ms_per_logged_step']['off']:.3f}), "
              f"{100 * share:.2f} % of a logging window", flush=True)
    print(f"[trackers] off: {result['off_step_ms']:.2f} ms/step; one system sample: "
          f"{result['system_sample_cpu_ms']:.3f} ms CPU", flush=True)
    save("trackers", result, Path(args.out) if args.out else None)


if __name__ == "__main__":
    main()
