"""A search's compute budget (tune.budget): no trial is launched that would take the search over it, and running
trials are ended when the search reaches it.

Each trial reports its cumulative cost with every result (TRIAL_KEYS: its worker group's hours so far, see
dtrain.launch.cost). Two Tune hooks read those results, each keeping its own Ledger: BudgetGate wraps the search
algorithm and stops handing out trials once the spend committed so far plus one more trial (the costliest finished
one) would exceed the budget; BudgetStopper (a Tune Stopper) ends the whole search when the spend reaches it.
"""

from __future__ import annotations

from typing import Any

from ray.tune import Stopper
from ray.tune.search import SearchAlgorithm

from dtrain.launch.search_space import BudgetConfig

TRIAL_KEYS = {"gpu_hours": "trial/gpu_hours", "cpu_hours": "trial/cpu_hours", "cost": "trial/cost"}
"""Result keys of a trial's cumulative GPU-hours, CPU-hours and money."""


class Ledger:
    """Spend per trial (the latest cumulative values it reported) and which trials have ended."""

    def __init__(self, limits: dict[str, float]) -> None:
        self.limits, self.spent, self.ended = limits, {}, set()

    def record(self, trial_id: str, result: dict[str, Any] | None, ended: bool = False) -> None:
        if result:
            self.spent[trial_id] = {k: float(result[key]) for k, key in TRIAL_KEYS.items() if key in result}
        if ended:
            self.ended.add(trial_id)

    def total(self, measure: str) -> float:
        return sum(values.get(measure, 0.0) for values in self.spent.values())

    def reached(self) -> str | None:
        """The first measure whose limit the spend has reached, or None."""
        return next((m for m, limit in self.limits.items() if self.total(m) >= limit), None)

    def next_would_exceed(self) -> str | None:
        """The first measure whose limit one more trial would take the search over: the ended trials' spend, each
        running trial at least the costliest ended one, plus one such trial. None while no trial has ended (nothing
        to estimate from) or when it fits."""
        for measure, limit in self.limits.items():
            ended = [self.spent.get(t, {}).get(measure, 0.0) for t in self.ended]
            if not ended:
                return None
            estimate = max(ended)
            running = [v.get(measure, 0.0) for t, v in self.spent.items() if t not in self.ended]
            committed = sum(ended) + sum(max(v, estimate) for v in running)
            if committed + estimate > limit:
                return measure
        return None


class BudgetStopper(Stopper):
    """Ends every running trial, and the search, once the trials' total spend reaches the budget."""

    def __init__(self, budget: BudgetConfig) -> None:
        self.ledger, self.told = Ledger(budget.limits()), False

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        self.ledger.record(trial_id, result)
        return False

    def stop_all(self) -> bool:
        measure = self.ledger.reached()
        if measure is not None and not self.told:
            self.told = True
            print(f"[dtrain] tune: budget reached ({measure} {self.ledger.total(measure):.4g} of "
                  f"{self.ledger.limits[measure]:g}); ending the running trials", flush=True)
        return measure is not None


class BudgetGate(SearchAlgorithm):
    """The search algorithm inner, except that it hands out no trial that would take the search over budget."""

    def __init__(self, inner: SearchAlgorithm, budget: BudgetConfig) -> None:
        self.inner, self.ledger, self.closed = inner, Ledger(budget.limits()), False

    @property
    def metric(self) -> str | None:
        return self.inner.metric

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    @property
    def total_samples(self) -> int:
        return self.inner.total_samples

    def add_configurations(self, experiments: Any) -> None:
        self.inner.add_configurations(experiments)

    def next_trial(self) -> Any:
        if self.closed:
            return None
        measure = self.ledger.next_would_exceed() or self.ledger.reached()
        if measure is not None:
            self.closed = True
            print(f"[dtrain] tune: launching no more trials: the next one would exceed tune.budget.{measure} "
                  f"({self.ledger.total(measure):.4g} of {self.ledger.limits[measure]:g} spent)", flush=True)
            return None
        return self.inner.next_trial()

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.ledger.record(trial_id, result)
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.ledger.record(trial_id, result, ended=True)
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def is_finished(self) -> bool:
        return self.closed or self.inner.is_finished()

    def set_finished(self) -> None:
        self.inner.set_finished()

    def has_checkpoint(self, dirpath: str) -> bool:
        return self.inner.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath: str, **kwargs: Any) -> None:
        self.inner.save_to_dir(dirpath, **kwargs)

    def restore_from_dir(self, dirpath: str) -> None:
        self.inner.restore_from_dir(dirpath)
