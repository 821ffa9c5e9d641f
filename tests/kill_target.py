"""What the random-kill test runs and kills: `python -m tests.kill_target JOB_JSON RUN_DIR` trains the job in 2
local processes (spawn_workers), resuming from RUN_DIR's newest intact checkpoint when it has one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    from dtrain.launch.spawn import spawn_workers

    job, run_dir = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    resume = any((run_dir / "checkpoints").glob("step_*"))
    summary = spawn_workers(job, run_dir, world=2, resume=resume)
    (run_dir / "summary_final.json").write_text(json.dumps(summary))
