"""The strategy registry: name -> the class that implements it (see base.Strategy).

Adding a strategy is one module in this package plus one line here. A strategy with its own job section
(trainer.<name>) declares its dataclass as ``Options``; the job schema picks it up from here. Modules are imported on
first use, and none imports its library at import time (DeepSpeed is slow to import).
"""

from __future__ import annotations

import importlib
from typing import Any

from dtrain.engine.strategies.base import StepResult, Strategy, StrategySetup
from dtrain.errors import ConfigError

STRATEGIES: dict[str, str] = {
    "ddp": "dtrain.engine.strategies.ddp:DDPStrategy",
    "deepspeed": "dtrain.engine.strategies.deepspeed:DeepSpeedStrategy",
    "fsdp": "dtrain.engine.strategies.fsdp:FSDPStrategy",
}


def strategy_class(name: str) -> type[Strategy]:
    """The class registered as `name`."""
    if name not in STRATEGIES:
        raise ConfigError(f"trainer.strategy: expected one of {', '.join(STRATEGIES)}, got {name!r}")
    module, attr = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module), attr)


def strategy_options() -> dict[str, type]:
    """{name: Options dataclass} of every registered strategy that has its own job section."""
    classes = {name: strategy_class(name) for name in STRATEGIES}
    return {name: cls.Options for name, cls in classes.items() if cls.Options is not None}


def build_strategy(name: str, setup: StrategySetup, options: Any = None) -> Strategy:
    """An instance of the strategy registered as `name`."""
    return strategy_class(name)(setup, options)


__all__ = ["STRATEGIES", "StepResult", "Strategy", "StrategySetup", "build_strategy", "strategy_class",
           "strategy_options"]
