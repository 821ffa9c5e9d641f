"""The vertical slice through Ray Train: job spec -> `dtrain train` -> TorchTrainer -> 2 DDP workers -> run dir."""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from dtrain.engine.checkpoint import pick_checkpoint, read_manifest
from dtrain.tracking import read_metrics
from tests.helpers import JOBS, ROOT


def test_the_embedded_ray_listens_on_loopback_only(ray_session):
    """This session's Ray is the one `dtrain train` without --address embeds (init_ray, compat.ray.init_local): its
    GCS, raylet, dashboard, agents and idle workers listen on 127.0.0.1 only. (A run's own workers and driver:
    tests/ray/test_local_head.py, on the `dtrain up` head.)"""
    import psutil

    found: dict[str, set[tuple[str, int]]] = {}
    for child in psutil.Process().children():  # not this process: its tests' own stores
        for name, addrs in _listening(child).items():
            found.setdefault(name, set()).update(addrs)
    assert {"gcs_server", "raylet"} <= set(found) and any(n.startswith("ray::") for n in found), found
    assert not beyond_loopback(found), f"listening beyond loopback: {beyond_loopback(found)}"


def _dtrain(args, address, **kwargs):
    return subprocess.run([sys.executable, "-m", "dtrain", *map(str, args), "--address", address],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs)


def test_workers_that_cannot_be_placed_fail_within_the_start_timeout(ray_session, tmp_path):
    """Another run holds the cluster's CPUs: the run says so in one line instead of waiting for ever."""
    from dtrain.config import load_job
    from dtrain.errors import DtrainError
    from dtrain.launch.train import fit_job

    cpus = int(ray_session.cluster_resources()["CPU"])
    hog = ray_session.remote(num_cpus=cpus - 1)(_Hog).remote()  # leaves 1 CPU: 2 workers cannot be placed
    ray_session.get(hog.ready.remote())
    job = load_job(JOBS / "mlp_digits.yaml", [f"runs_dir={tmp_path}", "name=starved", "trainer.start_timeout_s=3",
                                              "logging.progress=false", "logging.wandb.enabled=false"])
    started = time.monotonic()
    try:
        with pytest.raises(DtrainError, match=r"^trainer.start_timeout_s: the 2 workers \(1 CPUs each\) could not "
                                              r"be placed within 3 s"):
            fit_job(job)
    finally:
        ray_session.kill(hog)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "starved").exists()  # it never trained: the name is free again


def test_each_checkpoint_is_reported_to_ray_by_the_writer_thread_and_lands_intact(ray_session, tmp_path):
    """ray.train.report (a barrier of the workers, then the upload into the run folder) runs in each worker's
    checkpoint writer thread, not on the training thread; what Ray registers is every checkpoint, complete."""
    from dtrain.config import load_job
    from dtrain.engine.checkpoint import checkpoint_problem
    from dtrain.launch.train import fit_job
    from tests.faults import ReportThreads

    job = load_job(JOBS / "mlp_digits.yaml", [f"runs_dir={tmp_path}", "name=reported", "trainer.max_epochs=4",
                                              "checkpoint.keep=4", "trainer.early_stopping.monitor=null",
                                              "logging.progress=false", "logging.wandb.enabled=false"])
    fit_job(job, worker_callbacks=[ReportThreads(tmp_path)])
    for rank in (0, 1):
        threads = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert len(threads) == 4 and all(t.startswith("dtrain-checkpoint") for t in threads), (rank, threads)
    checkpoints = sorted(c for c in (tmp_path / "reported").glob("checkpoint_*") if c.is_dir())
    assert [read_manifest(c)["epoch"] for c in checkpoints] == [1, 2, 3, 4]
    assert all(checkpoint_problem(c) is None for c in checkpoints)


class _Hog:
    def ready(self) -> bool:
        return True


def test_sigterm_stops_a_run_with_one_line_and_resume_continues_the_moved_run_directory(ray_session, tmp_path):
    """SIGTERM (what a scheduler sends first) ends a run as Ctrl-C does; its run directory, copied elsewhere,
    resumes from its own newest checkpoint and leaves the original untouched."""
    address = ray_session.get_runtime_context().gcs_address
    common = ["logging.wandb.enabled=false", "logging.progress=false", "trainer.early_stopping.monitor=null",
              "model.hidden=[32]"]
    orig, copy = tmp_path / "a" / "orig", tmp_path / "b" / "copy"
    cmd = [sys.executable, "-m", "dtrain", "train", str(JOBS / "mlp_digits.yaml"), f"runs_dir={tmp_path / 'a'}",
           "name=orig", "trainer.max_epochs=500", *common, "--address", address]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(orig.glob("checkpoint_*")) and time.monotonic() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "dtrain: terminated (SIGTERM)" in err and "SIGTERM received" not in err + out

    shutil.copytree(orig, copy)
    before = (orig / "metrics.jsonl").read_text()
    newest = read_manifest(pick_checkpoint(sorted(copy.glob("checkpoint_*"), reverse=True)))
    again = _dtrain(["train", copy, f"trainer.max_epochs={newest['epoch'] + 1}", "--resume"], address)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "has no checkpoint yet" not in again.stdout
    assert (orig / "metrics.jsonl").read_text() == before  # the original is untouched
    events = read_metrics(copy)
    resumes = [i for i, e in enumerate(events) if e["event"] == "resume"]
    assert [events[i]["step"] for i in resumes] == [newest["step"]]  # from the copy's own newest checkpoint
    assert [e["epoch"] for e in events[resumes[0]:] if e["event"] == "epoch"] == [newest["epoch"] + 1]


def test_the_deepspeed_job_trains_in_bf16_and_prints_dtrains_lines_and_nothing_else(ray_session, tmp_path):
    """The DeepSpeed job file (ZeRO-2, bf16 weights) through the command line: it trains, Ray's merged checkpoint is
    DeepSpeed-readable, and of all that the workers, Ray Train's controller and DeepSpeed log (accelerator notices,
    Ray's own lines) the console shows dtrain's lines only (each printed once, without Ray's "(RayTrainWorker
    pid=...)" prefix)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dtrain.config import load_job, to_objects
    from dtrain.data import load_data
    from dtrain.engine.strategies.deepspeed import TAG
    from dtrain.models import build_model

    job_file = JOBS / "mlp_digits_deepspeed.yaml"
    overrides = [f"runs_dir={tmp_path}", "name=ds", "trainer.max_epochs=3", "logging.progress=false",
                 "logging.wandb.enabled=false"]
    job = load_job(job_file, overrides)
    assert job.trainer.deepspeed.zero_stage == 2 and job.trainer.precision == "bf16-mixed"
    proc = _dtrain(["train", job_file, *overrides], ray_session.get_runtime_context().gcs_address)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert [line for line in lines if not line.startswith("[dtrain]")] == []
    assert sum("epoch=" in line for line in lines) == 3

    summary = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["skipped_steps"] == 0
    assert summary["test"]["test/acc"] > 0.85
    epochs = [e for e in read_metrics(tmp_path / "ds") if e["event"] == "epoch"]
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    checkpoint = sorted((tmp_path / "ds").glob("checkpoint_*/deepspeed"))[-1]
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
    model = build_model(to_objects(job).model, load_data(to_objects(job).data).meta)
    model.load_state_dict(state, strict=True)


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _listening(root) -> dict[str, set[tuple[str, int]]]:
    """(address, port) of every listening socket of root and its descendants, by process name."""
    import psutil

    found: dict[str, set[tuple[str, int]]] = {}
    try:
        descendants = root.children(recursive=True)
    except psutil.Error:  # root exited meanwhile (an idle Ray worker, say)
        descendants = []
    for proc in [root, *descendants]:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.setdefault(proc.name(), set()).add((conn.laddr.ip, conn.laddr.port))
        except psutil.Error:  # gone meanwhile
            pass
    return found


def beyond_loopback(listening: dict[str, set[tuple[str, int]]]) -> dict[str, set[tuple[str, int]]]:
    """The processes of `listening` (_listening's result) with a socket on an address other than loopback."""
    return {name: addrs for name, addrs in listening.items() if {ip for ip, _ in addrs} - LOOPBACK}


@contextlib.contextmanager
def sockets_listened_on(root) -> Iterator[dict[str, set[tuple[str, int]]]]:
    """Every listening socket of the process root and its descendants while the block runs (polled), by process
    name; the sockets root already listened on before are left out."""
    import psutil

    seen: dict[str, set[tuple[str, int]]] = {}
    done = threading.Event()
    earlier = {conn.laddr for conn in root.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN}

    def watch() -> None:
        while not done.wait(1.0):  # Ray's sockets and the rendezvous store live as long as the run
            for name, addrs in _listening(root).items():
                seen.setdefault(name, set()).update(addrs)
            seen.get(root.name(), set()).difference_update(earlier)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield seen
    finally:
        done.set()
        watcher.join()


def assert_loopback_only(seen: dict[str, set[tuple[str, int]]]) -> None:
    """Ray (GCS, raylet, agents, dashboard, workers) listens on loopback only; torch's rendezvous store, which
    rank 0 serves on every interface (torch has no setting for its address), is the one exception."""
    assert {"gcs_server", "raylet"} <= set(seen), seen  # the watch saw Ray's processes, not just this one
    assert any(name.startswith("ray::") for name in seen), seen  # and workers/agents
    outside = {name: {a for a in addrs if a[0] not in LOOPBACK} for name, addrs in seen.items()}
    outside = {name: addrs for name, addrs in outside.items() if addrs}
    rendezvous = {addr for name, addrs in outside.items() if name.startswith("ray::") and (
        "RayTrainWorker" in name or "torch_process_group" in name) for addr in addrs}
    assert len({port for _, port in rendezvous}) <= 1, outside  # one store, rank 0's
    assert set().union(*outside.values()) == rendezvous, f"listening beyond loopback: {outside}"


def test_preflight_names_problems_found_before_any_worker(ray_session, tmp_path, capsys):
    """More workers than the cluster has and a broken data path: one `dtrain: error:` line each, exit 2, and no
    worker started (nothing to measure)."""
    from dtrain.cli import main

    rc = main(["preflight", str(JOBS / "mlp_digits.yaml"), "trainer.num_workers=5", "data.name=npz",
               f"data.path={tmp_path}/no.npz", f"runs_dir={tmp_path}/runs"])
    out, err = capsys.readouterr()
    assert rc == 2 and err.splitlines() == [
        f"dtrain: error: {tmp_path}/no.npz: .npz file not found",
        "dtrain: error: trainer.num_workers: 5 workers x 1.0 CPUs need 5 CPUs, the cluster has 4"], err
    assert "rank" not in out and not (tmp_path / "runs").exists()


@pytest.mark.alone  # times the machine twice: nothing else may run meanwhile
def test_preflights_projected_time_per_epoch_is_within_30_percent_of_the_run_that_follows(ray_session, tmp_path,
                                                                                           capsys):
    """`dtrain preflight` of the `make train` job (wider layers, for epochs of about a second), then the job itself on
    the same Ray: the epochs the run's
    metrics.jsonl times (from one epoch's end to the next: its steps, validation and checkpoint) take within 30 % of
    the s/epoch the preflight printed."""
    import json
    import re
    import statistics

    from dtrain.cli import main

    address = ray_session.get_runtime_context().gcs_address
    job = [str(JOBS / "mlp_digits.yaml"), "trainer.max_epochs=7", "model.hidden=[1024,1024]", f"runs_dir={tmp_path}",
           "name=run",
           "logging.wandb.enabled=false", "logging.progress=false", "--address", address]
    assert main(["preflight", *job]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    projected = float(re.search(r"projected: 21 steps/epoch, ([0-9.]+) s/epoch, 7 epochs", out).group(1))
    assert main(["train", *job]) == 0, capsys.readouterr().err
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ends = [e["time"] for e in events if e.get("event") == "epoch"]
    measured = statistics.median(b - a for a, b in zip(ends, ends[1:], strict=False))
    print(f"projected {projected:.3f} s/epoch, measured {measured:.3f} s/epoch (median of {len(ends) - 1})")
    assert abs(measured / projected - 1) <= 0.3, (projected, measured)
