"""Test-only fault injection: lets the fault-tolerance tests really kill a training process at a chosen step.

Set ``DTRAIN_TEST_KILL="<rank>:<step>:<marker file>"`` and that rank SIGKILLs itself right after optimizer step
<step>, once: it creates the marker file first, so the restarted or resumed run trains on. Unset, this is a no-op.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "DTRAIN_TEST_KILL"


def maybe_kill(rank: int, step: int) -> None:
    """SIGKILL this process if DTRAIN_TEST_KILL names this rank and step and its marker file does not exist yet."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want_rank, want_step, marker = spec.split(":", 2)
    if int(want_rank) == rank and int(want_step) == step and not Path(marker).exists():
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def env_for_workers() -> dict[str, str]:
    """The fault-injection variable, if set, for Ray workers' runtime_env (they do not inherit the driver's env)."""
    return {ENV: os.environ[ENV]} if ENV in os.environ else {}
