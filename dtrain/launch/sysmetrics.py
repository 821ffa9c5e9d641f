"""logging.system_metrics: each worker's CPU %, resident memory and (on GPUs, through NVML) utilisation and memory,
sampled by a background thread, never by the training thread.

The monitor is an engine Callback: its log_values() hands the window's aggregates to the loop at logged steps, and
the loop gathers them to rank 0 in the collective it makes there anyway (sys/<name>/rank<r> in metrics.jsonl and
every tracker). launch/worker.py installs it only when enabled.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from dtrain.engine.callbacks import Callback


class SystemMonitor(Callback):
    """Samples this process every interval_s seconds in a daemon thread; log_values() returns the means (maxima for
    memory) since the previous call: sys/cpu_percent, sys/rss_mb, and with CUDA sys/gpu_util_percent,
    sys/gpu_mem_mb."""

    def __init__(self, interval_s: float = 1.0) -> None:
        import psutil

        self.interval_s = interval_s
        self.process = psutil.Process(os.getpid())
        self.gpu = _nvml_handle()
        self.keys = ["cpu_percent", "rss_mb"] + (["gpu_util_percent", "gpu_mem_mb"] if self.gpu else [])
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._reset()
        # A window that ends before the first tick reports the process's CPU % since it started. (A psutil reading
        # right after the one that starts its interval divides a 10 ms clock tick by microseconds: 0 or 6000 %.)
        times = self.process.cpu_times()
        since_start = (times.user + times.system) / max(time.time() - self.process.create_time(), 1e-3) * 100
        self.process.cpu_percent(None)  # starts psutil's interval for the first tick
        self.latest = self._read(since_start)
        self._thread = threading.Thread(target=self._run, name="dtrain-sysmetrics", daemon=True)
        self._thread.start()

    def _reset(self) -> None:
        self.sums, self.peaks, self.n = dict.fromkeys(self.keys, 0.0), dict.fromkeys(self.keys, 0.0), 0

    def _read(self, cpu_percent: float) -> dict[str, float]:
        values = {"cpu_percent": cpu_percent, "rss_mb": self.process.memory_info().rss / 2**20}
        if self.gpu:
            import pynvml

            values["gpu_util_percent"] = float(pynvml.nvmlDeviceGetUtilizationRates(self.gpu).gpu)
            values["gpu_mem_mb"] = pynvml.nvmlDeviceGetMemoryInfo(self.gpu).used / 2**20
        return values

    def _sample(self) -> None:
        values = self._read(self.process.cpu_percent(None))
        with self._lock:
            for key, value in values.items():
                self.sums[key] += value
                self.peaks[key] = max(self.peaks[key], value)
            self.n, self.latest = self.n + 1, values

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def log_values(self) -> dict[str, float]:
        """The window's mean CPU % and GPU utilisation, and peak memory, as sys/<name> (a window shorter than the
        sampling interval repeats the latest sample)."""
        with self._lock:
            if self.n == 0:
                return {f"sys/{k}": self.latest[k] for k in self.keys}
            out = {f"sys/{k}": (self.peaks[k] if k.endswith("_mb") else self.sums[k] / self.n) for k in self.keys}
            self._reset()
        return out

    def close(self) -> None:
        """Stop the sampling thread."""
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> SystemMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _nvml_handle() -> Any:
    """NVML's handle of this process's CUDA device, or None without CUDA or without nvidia-ml-py."""
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        import pynvml
    except ImportError:
        print("[dtrain] system metrics: no GPU metrics (pip install nvidia-ml-py)", flush=True)
        return None
    try:  # NVML numbers devices its own way: find ours by UUID (CUDA_VISIBLE_DEVICES may renumber them)
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
    except Exception as err:  # a driver without NVML must not stop training
        print(f"[dtrain] system metrics: no GPU metrics (NVML: {str(err)[:200]})", flush=True)
        return None
