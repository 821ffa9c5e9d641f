"""`dtrain train` on one machine (by default where nothing needs Ray, or with --local): the workers as processes on
this machine, without Ray, through the real command line: a run with its whole record (config, summary with cost,
report, the newest `checkpoint.keep` checkpoints) and its progress bar; Ctrl-C and SIGTERM stop every process and keep
the last checkpoint, and --resume --local continues from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil

from dtrain.engine.checkpoint import checkpoint_problem, read_manifest
from dtrain.launch.spawn import latest_checkpoint
from dtrain.tracking import read_metrics
from tests.helpers import JOBS, ROOT
from tests.ray.test_train import LOOPBACK, _listening

COMMON = ["--local", "logging.wandb.enabled=false", "logging.progress=false", "trainer.early_stopping.monitor=null",
          "model.hidden=[32]"]


def _dtrain(args: list[str], **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dtrain", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "WANDB_MODE": "disabled"}, **popen)


def _long_run(runs, name: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A run of 500 epochs, once it has an intact checkpoint, and its processes (the ranks and the fork server)."""
    proc = _dtrain(["train", JOBS / "mlp_digits.yaml", *COMMON, f"runs_dir={runs}", f"name={name}",
                    "trainer.max_epochs=500"], start_new_session=True)  # its own group, as a terminal's job
    deadline = time.monotonic() + 120
    while not any(checkpoint_problem(c) is None for c in (runs / name / "checkpoints").glob("step_*")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= 2, tree  # 2 ranks (and the fork server)
    return proc, tree


def test_dtrain_train_as_typed_runs_locally_and_leaves_the_whole_record_and_the_newest_checkpoints(tmp_path):
    """No --local: on one machine with no Ray running, the `make train` command line starts no Ray (and draws its
    progress bar, as under Ray)."""
    plain = [a for a in COMMON if a not in ("--local", "logging.progress=false")]
    proc = _dtrain(["train", JOBS / "mlp_digits.yaml", *plain, f"runs_dir={tmp_path}", "name=local",
                    "trainer.max_epochs=3", "checkpoint.keep=1", "cost.per_cpu_hour=0.5"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "local"
    assert out.startswith("[dtrain] the workers run as processes on this machine (no Ray is running")
    assert f"[dtrain] run finished: {run}" in out and "[dtrain] test/acc = " in out
    noise = [line for line in (out + err).splitlines() if line.strip() and not line.startswith("[dtrain] ")]
    bar = [line for line in noise if line.startswith("train ")]  # drawn once at the end off a terminal
    assert len(bar) == 1 and " 63/63 " in bar[0] and "epoch 3 val/loss=" in bar[0], noise
    assert [line for line in noise if line not in bar] == []  # dtrain's own lines and nothing else
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["world_size"] == 2
    epochs = [e for e in read_metrics(run) if e.get("event") == "epoch"]
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"] and summary["test"]["test/acc"] > 0.5  # 5x chance
    cost = summary["cost"]  # the 2 local processes' lifetime, priced
    assert cost["segments"] == 1 and cost["cpu_hours"] * 3600 >= 2 * summary["wall_time_s"]
    assert cost["cost"] == cost["cpu_hours"] * 0.5
    assert (run / "config.yaml").is_file() and (run / "report" / "report.md").is_file()
    kept = list((run / "checkpoints").glob("step_*"))
    assert [read_manifest(c)["step"] for c in kept] == [summary["steps"]], kept  # keep=1: the final one only


def test_ctrl_c_stops_every_process_and_resume_local_continues_from_the_last_checkpoint(tmp_path):
    proc, tree = _long_run(tmp_path, "ctrl-c")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "dtrain: interrupted", err[-3000:]
    assert "Traceback" not in err
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    assert alive == [], [p.pid for p in alive]

    run = tmp_path / "ctrl-c"
    start = read_manifest(latest_checkpoint(run))
    again = _dtrain(["train", run, "--resume", *COMMON, f"trainer.max_epochs={start['epoch'] + 1}"])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    resumes = [e for e in read_metrics(run) if e.get("event") == "resume"]
    assert [r["step"] for r in resumes] == [start["step"]]
    assert json.loads((run / "summary.json").read_text())["epochs"] == start["epoch"] + 1


def test_sigterm_to_the_command_alone_stops_its_workers_too(tmp_path):
    """A scheduler's SIGTERM reaches the `dtrain` process only: it must stop the ranks it started, not wait for them
    to train 500 epochs."""
    proc, tree = _long_run(tmp_path, "term")
    # Meanwhile, what the run listens on: loopback only, but for the rendezvous store that rank 0 serves on every
    # interface (torch has no setting for its address), as under Ray (tests/ray/test_train.py).
    listening = _listening(psutil.Process(proc.pid))
    outside = {addr for addrs in listening.values() for addr in addrs if addr[0] not in LOOPBACK}
    assert len({port for _, port in outside}) == 1 and len(set().union(*listening.values())) > len(outside), listening
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    out, err = proc.communicate(timeout=120)
    _gone, alive = psutil.wait_procs(tree, timeout=30)
    assert proc.returncode == 143 and "dtrain: terminated (SIGTERM)" in err, err[-3000:]
    assert alive == [], [p.pid for p in alive]
    assert time.monotonic() - sent < 15  # stopped, not left to linger until something else ends them
    assert "[dtrain] run finished" not in out


def test_resume_of_a_run_stopped_before_its_first_checkpoint_says_it_starts_again(tmp_path):
    from dtrain.config import load_job
    from dtrain.launch.train import claim_run_dir

    job = load_job(JOBS / "mlp_digits.yaml", [f"runs_dir={tmp_path}", "name=early", "model.hidden=[32]"])
    run = claim_run_dir(job, resume=False)  # config.yaml written, then stopped before any checkpoint
    proc = _dtrain(["train", run, "--resume", *COMMON, "trainer.max_epochs=1"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"[dtrain] {run} has no checkpoint yet: the run starts again from step 0" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 21  # one whole epoch, from step 0


def test_a_resume_that_changes_what_the_checkpoint_holds_is_one_line_and_loses_nothing(tmp_path):
    """An override of the model or optimizer on --resume is refused before any worker starts (the checkpoint's
    optimizer state would silently win over a new optim.lr; another model would not load); a config.yaml edited by
    hand gets as far as the workers, whose load fails with one line naming the mismatch, not torch's traceback and
    the launcher's lines about the ranks it stopped."""
    first = _dtrain(["train", JOBS / "mlp_digits.yaml", *COMMON, f"runs_dir={tmp_path}", "name=r",
                     "trainer.max_epochs=1"])
    assert first.wait(timeout=300) == 0, first.communicate()[1][-3000:]
    run = tmp_path / "r"
    kept = latest_checkpoint(run)
    for override, message in [
            ("model.hidden=[16]", "dtrain: error: model.hidden: a resumed run continues from its checkpoint, which "
                                  "was trained with model.hidden=[32], got [16]; start a new run to change it"),
            ("optim.lr=0.1", "dtrain: error: optim.lr: a resumed run continues from its checkpoint, which was "
                             "trained with optim.lr=0.002, got 0.1; start a new run to change it")]:
        proc = _dtrain(["train", run, "--resume", *COMMON, override, "trainer.max_epochs=2"])
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2 and err.strip().splitlines() == [message], err[-3000:]
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("hidden:\n  - 32", "hidden:\n  - 16"))
    proc = _dtrain(["train", run, "--resume", "--local", "trainer.max_epochs=2"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    assert err.strip().splitlines() == [
        f"dtrain: error: {kept}: the checkpoint does not fit this job's model (size mismatch for net.1.weight: "
        "copying a param with shape torch.Size([32, 64]) from checkpoint, the shape in current model is "
        "torch.Size([16, 64]).); resume it with the model it was trained with"], err[-3000:]
    assert latest_checkpoint(run) == kept and checkpoint_problem(kept) is None


def test_on_a_terminal_the_ranks_lines_go_above_the_progress_bar_not_into_it(tmp_path):
    """The ranks print their epoch lines while the driver draws the bar on the same terminal: the lines pass through
    the driver, which prints them above the bar (as Ray's workers' lines are), rather than at the bar's end."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "dtrain", "train", str(JOBS / "mlp_digits.yaml"),
                             "logging.wandb.enabled=false", "trainer.early_stopping.monitor=null", "model.hidden=[32]",
                             "trainer.max_epochs=12", f"runs_dir={tmp_path}", "name=tty"], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower,
                            env={**os.environ, "WANDB_MODE": "disabled", "COLUMNS": "200"})
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal's other end closed: the command ended
            break
        if not chunk:
            break
        shown += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, shown.decode(errors="replace")[-3000:]
    # What the terminal shows on each line (a terminal ends lines with \r\n): the text after its last carriage return.
    lines = [line.rstrip("\r").rsplit("\r", 1)[-1] for line in shown.decode(errors="replace").split("\n")]
    epochs = [line for line in lines if "[dtrain] stage=train epoch=" in line]
    assert len(epochs) == 12 and "━" in shown.decode(errors="replace"), lines  # the lines, and a bar drawn
    assert not [line for line in epochs if "━" in line], epochs  # none written at the end of the bar
