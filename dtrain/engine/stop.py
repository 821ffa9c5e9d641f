"""A request to stop training at a step boundary (SIGTERM: a spot reclaim, a pod deletion), shared by the loop and
the launchers' signal handlers. No torch here: Ray imports it into every worker process at start-up."""

from __future__ import annotations

import threading

STOP_REQUESTED = threading.Event()
"""Set when this process is asked to stop: the loop checkpoints at a step boundary every rank agrees on, then
raises Preempted (see dist.StepVote)."""
TRAINING = threading.Event()
"""Set while a training loop runs in this process."""


def request_stop(*_: object) -> None:
    """Ask this process's training loop to checkpoint and stop (usable as a signal handler)."""
    STOP_REQUESTED.set()


def stop_if_training() -> bool:
    """Ask the running training loop to stop, the first time; False when no loop runs or it was asked already
    (the caller then stops the process its own way)."""
    if not TRAINING.is_set() or STOP_REQUESTED.is_set():
        return False
    STOP_REQUESTED.set()
    return True
