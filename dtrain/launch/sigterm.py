"""Ray workers' start-up hook: a SIGTERM to a process that trains (a spot reclaim, a pod deletion) makes the run
checkpoint at the next step boundary every rank agrees on and hand over, instead of ending the process at once."""

from __future__ import annotations

from dtrain.compat import ray as ray_compat
from dtrain.engine.stop import stop_if_training


def graceful_sigterm() -> None:
    """Installed in every Ray worker process of a dtrain run (runtime_env worker_process_setup_hook): the first
    SIGTERM during training asks the loop to stop; otherwise, or at a second one, Ray's own handler exits."""
    ray_compat.wrap_worker_sigterm(stop_if_training)
