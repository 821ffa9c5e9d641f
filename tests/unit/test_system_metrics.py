"""Per-worker system metrics (sampled off the training thread, gathered to rank 0 at logged steps) and the loop's
split of each logging window into data wait, forward/backward, optimizer and other host time."""

from __future__ import annotations

import time

from dtrain.engine.callbacks import Callback
from dtrain.launch.spawn import spawn_workers
from dtrain.report import write_report
from dtrain.tracking import read_metrics
from tests.helpers import small_job


class RankProbe(Callback):
    """Reports a value only its rank knows, and spends 20 ms after each step (time the loop must call 'other')."""

    def __init__(self) -> None:
        self.rank = -1

    def on_setup(self, strategy, model, rank: int) -> None:
        self.rank = rank

    def on_step_end(self, state, rank: int) -> None:
        time.sleep(0.02)

    def log_values(self) -> dict[str, float]:
        return {"probe": 10.0 * self.rank + 1}


def test_system_metrics_and_time_split_reach_rank_zero(tmp_path):
    job = small_job(**{"trainer.max_epochs": 1, "logging.system_metrics.enabled": "true",
                       "logging.system_metrics.interval_s": 0.05})
    spawn_workers(job, tmp_path, world=2, callbacks=[RankProbe()])
    steps = [e for e in read_metrics(tmp_path) if e["event"] == "step"]
    assert len(steps) >= 3
    for e in steps:
        assert (e["probe/rank0"], e["probe/rank1"]) == (1.0, 11.0), "each rank's value in its own slot"
        for r in (0, 1):
            assert 50 < e[f"sys/rss_mb/rank{r}"] < 16_000 and 0 <= e[f"sys/cpu_percent/rank{r}"] <= 800
    # (a logged step's callbacks run after its record: the first window of an epoch holds one sleep fewer)
    for e in steps[1:]:
        phases = {k: e[f"time/{k}_s"] for k in ("data", "forward_backward", "optimizer", "other")}
        assert all(v >= 0 for v in phases.values())
        assert phases["other"] >= 0.02 > phases["forward_backward"], "the callback's sleep is charged to other"
        assert 0.7 * e["step_time_s"] < sum(phases.values()) < 1.3 * e["step_time_s"], "phases cover the step"
    assert len({e["sys/rss_mb/rank1"] for e in steps} | {e["sys/rss_mb/rank0"] for e in steps}) > 1
    report = write_report(tmp_path).read_text()
    assert "![time_split](time_split.png)" in report and "![system](system.png)" in report
    assert (tmp_path / "report" / "system.png").stat().st_size > 10_000



def test_a_window_that_ends_before_the_first_tick_reports_a_real_cpu_percent():
    """A window shorter than the sampling interval reports the CPU % since the process started, never a reading
    taken microseconds after the one that starts psutil's interval (a 10 ms clock tick over microseconds: up to
    6000 % on a busy 2-core machine)."""
    import os
    import threading

    from dtrain.launch.sysmetrics import SystemMonitor

    stop = threading.Event()

    def busy() -> None:  # a second thread of this process using CPU, as the training thread does (numpy's matrix
        # product releases the GIL, so the monitors below are not slowed down by it)
        import numpy as np

        a = np.ones((256, 256))
        while not stop.is_set():
            a @ a

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        readings = []
        for _ in range(300):
            with SystemMonitor(interval_s=60.0) as monitor:
                readings.append(monitor.log_values()["sys/cpu_percent"])
    finally:
        stop.set()
        thread.join()
    assert 0 < min(readings) and max(readings) <= 100 * os.cpu_count(), (min(readings), max(readings))
