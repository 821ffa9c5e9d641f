"""Reading a run back from the trackers' own stores: MLflow through MlflowClient, TensorBoard through
TensorBoard's EventAccumulator; and the comparison with metrics.jsonl every tracker must match."""

from __future__ import annotations

import math
from pathlib import Path

from dtrain.tracking import read_metrics
from dtrain.tracking.base import step_values, summary_values


def expected_values(run_dir: Path) -> dict[str, dict[int, float]]:
    """{key: {step: value}} every tracker should hold for the run (the latest event wins per step)."""
    out: dict[str, dict[int, float]] = {}
    for event in read_metrics(run_dir):
        at = step_values(event)
        if at is not None:
            for key, value in at[1].items():
                out.setdefault(key, {})[at[0]] = value
    return out


def mlflow_values(client, run_id: str, keys) -> dict[str, dict[int, float]]:
    return {k: {m.step: m.value for m in client.get_metric_history(run_id, k)} for k in keys}


def tensorboard_values(folder: Path) -> tuple[dict[str, dict[int, float]], set[str]]:
    """({tag: {step: value}}, text tags) of every event file in folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags["scalars"]}
    return scalars, set(tags["tensors"])


def assert_same(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]], rel: float, where: str) -> None:
    for key, steps in want.items():
        assert key in got, f"{where}: {key} missing"
        assert set(steps) <= set(got[key]), f"{where}: {key} lacks steps {sorted(set(steps) - set(got[key]))}"
        for step, value in steps.items():
            assert math.isclose(got[key][step], value, rel_tol=rel, abs_tol=1e-12), (where, key, step)


def assert_summary(got: dict[str, dict[int, float]], end: dict, rel: float, where: str) -> None:
    for key, value in summary_values(end).items():
        if isinstance(value, int | float):
            assert math.isclose(got[key][end["steps"]], value, rel_tol=rel), (where, key)
