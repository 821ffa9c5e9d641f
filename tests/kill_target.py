"""What the random-kill test starts and kills: a process forked from the test's fork server (torch and the worker
code imported already) that trains the job in 2 ranks forked from itself (spawn_workers with "fork"), resuming from
RUN_DIR's newest intact checkpoint when it has one, in a session of its own (so that one killpg ends it and its
ranks) with its output in LOG."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def run(job_file: str, run_dir: str, log: str) -> None:
    os.setsid()
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    import sklearn.datasets  # noqa: F401 - imported once here rather than by each rank

    from dtrain.launch.spawn import spawn_workers

    job, run_dir = json.loads(Path(job_file).read_text()), Path(run_dir)
    resume = any((run_dir / "checkpoints").glob("step_*"))
    summary = spawn_workers(job, run_dir, world=2, resume=resume, start_method="fork")
    (run_dir / "summary_final.json").write_text(json.dumps(summary))
    sys.stdout.flush()
