"""`dtrain submit` / `dtrain jobs` against a real 2-node Ray cluster on 127.0.0.1 with token auth.

The cluster comes from cluster/local/up.sh (one head + one worker node, 1 CPU each, own ports and temp dirs), so
the script behind `make cluster-up` is exercised too; down.sh stops exactly its processes at the end. The in-process
`ray_session` fixture is not used here and is not disturbed: different ports, temp dirs and no ray.init.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
UP, DOWN = ROOT / "cluster/local/up.sh", ROOT / "cluster/local/down.sh"
SPEC = """\
model: {name: mlp, hidden: [32]}
data: {name: digits, batch_size: 64}
trainer: {num_workers: 2, max_epochs: 2, log_every_n_steps: 50}
logging: {wandb: {enabled: "false"}}
"""


@dataclass
class Cluster:
    address: str
    token: str
    env: dict[str, str]  # environment for client subprocesses: token set, PATH with this venv first
    gcs: str = ""  # the head's GCS address, for `dtrain ... --address HOST:PORT` drivers
    state: Path | None = None  # up.sh's state folder: the nodes' pid files
    up_env: dict[str, str] | None = None  # up.sh's environment (to add a node)


def _ports_free(ports: list[int]) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _port_base() -> int:
    """A block of 300 ports (3 nodes x 100, see up.sh; a node may join) below the ephemeral range that nothing
    listens on."""
    for _ in range(50):
        base = random.randrange(20000, 29700, 100)
        if _ports_free([base + i for i in (*range(0, 12), *range(100, 112), *range(200, 212))]):
            return base
    raise RuntimeError("no free port block for the test cluster")


def _client_env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_API"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", WANDB_MODE="offline", WANDB_SILENT="true")
    if token:
        env["RAY_AUTH_TOKEN"] = token
    return env


@pytest.fixture(scope="module")
def cluster():
    state = Path(tempfile.mkdtemp(prefix="dtr-", dir="/tmp"))  # short: Ray's socket paths live under it
    token, base = secrets.token_hex(16), _port_base()
    env = _client_env(token)
    env.update(DTRAIN_CLUSTER_DIR=str(state), RAY=str(BIN / "ray"), WORKERS="1", CPUS_PER_NODE="1",
               PORT_BASE=str(base), GCS_PORT=str(base + 7), DASHBOARD_PORT=str(base + 8), RAY_AUTH_MODE="token",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="1", RAY_health_check_period_ms="1000",
               RAY_health_check_timeout_ms="5000", RAY_health_check_failure_threshold="5")
    up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=240)
    try:
        assert up.returncode == 0, f"cluster/local/up.sh failed:\n{up.stdout}\n{up.stderr}"
        assert sorted(p.name for p in state.glob("*.pid")) == ["head.pid", "worker1.pid"]
        yield Cluster(f"http://127.0.0.1:{base + 8}", token, _client_env(token), f"127.0.0.1:{base + 7}", state, env)
    finally:
        down = subprocess.run(["bash", str(DOWN)], env=env, capture_output=True, text=True, timeout=180)
        shutil.rmtree(state, ignore_errors=True)
        assert down.returncode == 0, down.stderr


@pytest.fixture
def spec(tmp_path) -> Path:
    """A small job spec outside the project tree, so submit must ship it beside the code."""
    path = tmp_path / "digits_small.yaml"
    path.write_text(SPEC)
    return path


def dtrain(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real `dtrain` command line in a fresh process."""
    return subprocess.run([str(BIN / "dtrain"), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def _use_token(monkeypatch, cluster: Cluster) -> None:
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", cluster.token)


def test_submit_preflight_follow_ships_the_users_project_and_succeeds_with_workers_on_two_nodes(
        cluster, tmp_path, monkeypatch, capsys):
    """`dtrain submit --preflight --follow`: the preflight runs on the cluster first (the job's 2 workers placed on
    the 2 nodes, a few real steps, all-reduce, checkpoint round trip in runs_dir; a table row per rank, the
    projection and its cost; nothing left in runs_dir), then the job. The job file's project
    (examples/user_project: the mynets package, its own loss and data loader) travels as the job's working_dir
    with dtrain beside it (nothing else on the cluster can import mynets); its 2 workers land on the 2 nodes;
    dtrain's, Ray's and the CLI's views of the job agree. (A job file from outside any project is staged beside
    the code: tests/unit/test_submit_client.py, and the stop test below submits one.)"""
    from dtrain.cli import main
    from dtrain.launch import submit
    from dtrain.launch.preflight import PROBE_PREFIX

    spec, runs = ROOT / "examples/user_project/jobs/smallnet_spirals.yaml", tmp_path / "runs"
    run = dtrain(["submit", str(spec), "trainer.max_epochs=15", "logging.progress=false", "name=two-nodes",
                  f"runs_dir={runs}", "cost.per_cpu_hour=0.5", "--preflight", "--address", cluster.address,
                  "--follow"], cluster.env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = _rows(run.stdout)
    assert [r[0] for r in rows] == ["0", "1"] and rows[0][1] != rows[1][1], run.stdout  # one worker per node
    assert "[dtrain] preflight passed: 2 workers" in run.stdout
    per_epoch, epoch_s, steps = re.search(r"projected: (\d+) steps/epoch, ([0-9.]+) s/epoch, 15 epochs \((\d+) steps\)",
                                          run.stdout).groups()
    assert int(steps) == 15 * int(per_epoch) and float(epoch_s) > 0, run.stdout
    cpu_hours, money = re.search(r"projected cost: 0 GPU-hours, (\S+) CPU-hours .*, cost (\S+)", run.stdout).groups()
    assert float(money) == pytest.approx(0.5 * float(cpu_hours), rel=1e-3)
    assert not list(runs.glob(f"{PROBE_PREFIX}*")) and (runs / "two-nodes" / "summary.json").is_file()
    job_id = re.search(r"^(raysubmit_\S+)$", run.stdout, re.MULTILINE).group(1)
    # The followed logs carry the cluster-side `dtrain train` output, final test metrics included.
    acc = float(re.search(r"\[dtrain\] test/acc = ([0-9.]+)", run.stdout).group(1))
    assert acc > 0.8, run.stdout[-2000:]  # a linear model gets about 0.6 on the spirals
    assert f"job {job_id} SUCCEEDED" in run.stderr

    _use_token(monkeypatch, cluster)
    client = submit.connect(cluster.address)
    info = submit.status(client, job_id)
    assert str(info.status) == "SUCCEEDED" and info.metadata["dtrain_name"] == "two-nodes"
    # The spec runs from the project's root (its path inside the project), not from dtrain's repository.
    assert info.entrypoint.startswith("python -m dtrain train jobs/smallnet_spirals.yaml "), info.entrypoint
    assert "--address auto" in info.entrypoint and "trainer.max_epochs=15" in info.entrypoint
    assert "[dtrain] test/acc" in submit.logs(client, job_id)
    # 2 workers x 1 CPU on nodes of 1 CPU each: Ray had to place them on different nodes.
    nodes = submit.worker_nodes(client, job_id)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes

    assert main(["jobs", "status", job_id, "--address", cluster.address]) == 0
    out = capsys.readouterr().out
    assert "SUCCEEDED" in out and "2 on 2 node(s)" in out
    assert main(["jobs", "list", "--address", cluster.address]) == 0
    assert re.search(rf"{job_id}\s+SUCCEEDED\s+two-nodes", capsys.readouterr().out)

    # Ray's own CLI sees the job too (it needs RAY_AUTH_MODE=token to send the token).
    ray_cli = subprocess.run([str(BIN / "ray"), "job", "status", job_id, "--address", cluster.address],
                             env={**cluster.env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                             timeout=120)
    assert ray_cli.returncode == 0, ray_cli.stderr[-2000:]
    plain = re.sub(r"\x1b\[[0-9;]*m", "", ray_cli.stdout)  # drop its colors
    assert f"Job '{job_id}' succeeded" in plain, plain[-2000:]


def test_submit_to_a_bucket_runs_on_two_nodes_that_share_no_folder_and_leaves_the_whole_record_there(
        cluster, s3, spec, tmp_path, monkeypatch):
    """`dtrain submit ... runs_dir=s3://...` on the 2-node cluster, whose nodes have their own temp folders and share
    no run directory: the job succeeds with a worker on each node, and its whole record (config, metrics, summary
    with cost, report, the offline W&B run, checkpoints sealed by both ranks) is in the bucket afterwards."""
    import uuid

    from dtrain.launch import submit
    from tests.ray.test_objstore import download

    prefix = f"dtrain-test/{uuid.uuid4().hex[:8]}/runs"
    run = dtrain(["submit", str(spec), f"runs_dir=s3://{prefix}", "name=bucket", "logging.wandb.enabled=true",
                  "--address", cluster.address, "--follow"], cluster.env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    job_id = re.search(r"^(raysubmit_\S+)$", run.stdout, re.MULTILINE).group(1)
    _use_token(monkeypatch, cluster)
    nodes = submit.worker_nodes(submit.connect(cluster.address), job_id)
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
    files = download(s3, f"{prefix}/bucket", tmp_path / "bucket")
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "cost.jsonl", "report/report.md"):
        assert name in files, sorted(files)
    summary = json.loads(files["summary.json"])
    assert summary["epochs"] == 2 and summary["cost"]["cpu_hours"] > 0, summary
    assert any(n.startswith("wandb/") and n.endswith(".wandb") for n in files), sorted(files)
    newest = max(n.split("/")[0] for n in files if n.startswith("checkpoint_") and "/" in n)
    assert {f"{newest}/manifest_rank0.json", f"{newest}/manifest_rank1.json", f"{newest}/model.pt"} <= set(files)


def test_stop_long_job(cluster, spec, monkeypatch, capsys):
    """`dtrain jobs stop` on a job that is training: the job ends STOPPED and its training worker processes on both
    nodes are gone (nothing keeps the cluster's CPUs), without the run finishing."""
    import psutil

    from dtrain.cli import main
    from dtrain.launch import submit

    _use_token(monkeypatch, cluster)
    assert main(["submit", str(spec), "trainer.max_epochs=100000", "--address", cluster.address]) == 0
    job_id = capsys.readouterr().out.splitlines()[0].strip()
    client = submit.connect(cluster.address)
    deadline = time.monotonic() + 180
    # 100000 epochs would run for hours, so only the stop can end it: stop it once it has trained an epoch.
    while not re.search(r"\[dtrain\] stage=\S+ epoch=1 step=", submit.logs(client, job_id)):
        assert str(submit.status(client, job_id).status) in ("PENDING", "RUNNING"), submit.logs(client, job_id)[-3000:]
        assert time.monotonic() < deadline, "the job never finished its first epoch:\n" + submit.logs(client, job_id)
        time.sleep(0.5)
    workers = submit.job_actors(client, job_id, detail=True)
    assert [w["state"] for w in workers] == ["ALIVE", "ALIVE"], workers
    pids = [psutil.Process(w["pid"]) for w in workers]  # the nodes are processes on this machine
    assert main(["jobs", "stop", job_id, "--address", cluster.address]) == 0
    assert capsys.readouterr().out.split() == [job_id, "STOPPED"]
    info = submit.status(client, job_id)
    assert str(info.status) == "STOPPED" and info.end_time is not None
    _gone, alive = psutil.wait_procs(pids, timeout=60)
    assert alive == [], [p.cmdline() for p in alive]
    assert "[dtrain] run finished" not in submit.logs(client, job_id)


def test_unknown_job_and_bad_address_give_one_line_errors(cluster, monkeypatch, capsys):
    from dtrain.cli import main

    _use_token(monkeypatch, cluster)
    assert main(["jobs", "status", "raysubmit_doesnotexist", "--address", cluster.address]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"dtrain: error: job raysubmit_doesnotexist: no such job on {cluster.address}"

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    assert main(["jobs", "list", "--address", f"127.0.0.1:{closed}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"dtrain: error: --address http://127.0.0.1:{closed}: no Ray dashboard answers there")
    assert len(err.strip().splitlines()) == 1


def test_token_from_file_wrong_token_and_missing_token(cluster, spec, tmp_path, monkeypatch, capsys):
    from dtrain.cli import main

    _use_token(monkeypatch, cluster)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["jobs", "list", "--address", cluster.address]) == 2
    assert capsys.readouterr().err.strip() == (f"dtrain: error: --address {cluster.address}: the cluster rejected "
                                               "the token from RAY_AUTH_TOKEN")

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text(cluster.token + "\n")
    assert main(["jobs", "list", "--address", cluster.address]) == 0

    # No token anywhere: a fresh process, so no token Ray cached in this one can leak into the request.
    env = {**_client_env(None), "HOME": str(tmp_path / "empty-home")}
    run = dtrain(["submit", str(spec), "--address", cluster.address], env, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"dtrain: error: --address {cluster.address}: the cluster requires a token and "
                                  "none was found; set RAY_AUTH_TOKEN or put it in ~/.ray/auth_token "
                                  "(`ray get-auth-token` on the head)")


PREFLIGHT_SPEC = """\
model: {name: mlp, hidden: [64]}
data: {name: digits, batch_size: 16}
trainer: {num_workers: 2, max_epochs: 4, log_every_n_steps: 1000}
checkpoint: {keep: 1}
logging: {wandb: {enabled: "false"}, progress: false}
cost: {per_cpu_hour: 0.5}
"""


def _rows(stdout: str) -> list[list[str]]:
    """The per-rank rows of preflight's table: rank, node, device, ..."""
    return [line.split() for line in stdout.splitlines() if re.match(r"\s+\d+\s+\S+/\S+\s+cpu\s", line)]


def test_submit_preflight_names_each_problem_and_submits_nothing(cluster, tmp_path, monkeypatch):
    """`dtrain submit --preflight` runs the preflight on the cluster: the workers on both nodes find runs_dir not
    writable and a step over the memory limit, one `dtrain: error:` line per problem and rank; the job is not
    submitted."""
    from dtrain.launch import submit

    spec = tmp_path / "pf.yaml"
    spec.write_text(PREFLIGHT_SPEC)
    (tmp_path / "afile").write_text("a file, not a folder\n")
    run = dtrain(["submit", str(spec), f"runs_dir={tmp_path / 'afile' / 'runs'}", "model.hidden=[4096,4096]",
                  "name=doomed", "--preflight", "--memory-limit", "600MiB", "--address", cluster.address], cluster.env)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    errors = [line for line in run.stdout.splitlines() if line.startswith("dtrain: error: ")]
    assert len(_rows(run.stdout)) == 2, run.stdout  # the workers ran and measured
    assert sorted(e.split(":")[2].strip() for e in errors) == ["model", "model", "runs_dir", "runs_dir"], errors
    assert all("over the memory limit of 0.59 GiB" in e for e in errors if ": model:" in e)
    assert all("Not a directory" in e for e in errors if ": runs_dir:" in e)
    assert run.stderr.strip().splitlines()[-1] == ("dtrain: error: preflight: the job was not submitted: the "
                                                   "preflight on the cluster ended FAILED (its problems are listed "
                                                   "above)")
    _use_token(monkeypatch, cluster)
    doomed = [j for j in submit.list_jobs(submit.connect(cluster.address)) if (j.metadata or {}).get("dtrain_name")
              == "doomed"]
    assert [j.metadata["dtrain_command"] for j in doomed] == ["preflight"]


def test_submit_preflight_names_too_many_workers_and_a_broken_data_path_before_any_worker(cluster, tmp_path):
    """The preflight's driver-side checks, on the cluster: 3 workers of 1 CPU on 2 nodes of 1 CPU, and a data file
    that is not there: one line each, exit 2, nothing placed, the job not submitted."""
    spec = tmp_path / "pf.yaml"
    spec.write_text(PREFLIGHT_SPEC)
    run = dtrain(["submit", str(spec), "trainer.num_workers=3", "data.name=npz", f"data.path={tmp_path}/no.npz",
                  "name=doomed2", "--preflight", "--address", cluster.address], cluster.env)
    assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
    errors = [line for line in run.stdout.splitlines() if line.startswith("dtrain: error: ")]
    assert errors == [f"dtrain: error: {tmp_path}/no.npz: .npz file not found",
                      "dtrain: error: trainer.num_workers: 3 workers x 1.0 CPUs need 3 CPUs, the cluster has 2"], errors
    assert not _rows(run.stdout), run.stdout  # no worker ran
    assert "the job was not submitted" in run.stderr.strip().splitlines()[-1]


# start_timeout_s is short and max_failures high: after a node leaves, Ray's view of the cluster (refreshed every
# 20 s) still counts it for a while, and each try at the old size ends after start_timeout_s as a controller failure
ELASTIC_SPEC = """\
name: elastic
model: {name: module, target: "elastic_gated:GatedMLP"}
data: {name: digits, global_batch_size: 64, batch_size: 32}
trainer: {num_workers: [1, 2], max_epochs: 40, max_failures: 20, log_every_n_steps: 21, resize_check_s: 2,
          start_timeout_s: 6, collective_timeout_s: 60}
checkpoint: {every_n_epochs: 1, keep: 3}
logging: {wandb: {enabled: "false"}, progress: false}
"""


GATED_MODEL = """\
import pathlib
import time

from torch import nn

GATE = pathlib.Path(__file__).with_name("gate")


class GatedMLP(nn.Module):
    \"\"\"64 -> 1024 -> 1024 -> classes, whose forward waits while the file `gate` lies beside this module: the test
    holds the run at a world size while it changes the cluster (the math is the plain MLP's).\"\"\"

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], 1024), nn.ReLU(), nn.Linear(1024, 1024),
                                 nn.ReLU(), nn.Linear(1024, num_classes))

    def forward(self, x):
        while GATE.exists():
            time.sleep(0.1)
        return self.net(x)
"""


def _kill_tree(pid: int) -> None:
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def test_an_elastic_run_shrinks_when_a_node_dies_grows_when_one_joins_and_checkpoints_on_a_drain(cluster, tmp_path,
                                                                                                 monkeypatch):
    """`trainer.num_workers: [1, 2]` on the 2-node cluster (1 CPU each): SIGKILL the worker node's Ray processes
    mid-run -> the run goes on with 1 worker from the newest checkpoint; a new node joins (`up.sh --add 1`) -> it
    grows back to 2; SIGTERM that node's `ray start` (what `kubectl delete pod` sends; Ray drains the node for
    preemption) -> both ranks checkpoint at the next step boundary and hand over, and the run finishes on 1 worker
    from that checkpoint. Each segment resumes exactly where a checkpoint left off, and the final weights equal those
    of an uninterrupted 2-worker run up to floating-point reduction order.

    The model's forward waits while a gate file exists: after two epochs on 1 worker the test closes the gate until
    the run has grown, so how fast the cluster changes does not decide which phases the run sees before it ends."""
    import yaml

    from dtrain.engine.checkpoint import checkpoint_problem, safe_load
    from dtrain.launch.spawn import spawn_workers
    from dtrain.tracking import read_metrics

    spec, runs = tmp_path / "elastic.yaml", tmp_path / "runs"
    spec.write_text(ELASTIC_SPEC)
    (tmp_path / "elastic_gated.py").write_text(GATED_MODEL)
    gate = tmp_path / "gate"
    monkeypatch.syspath_prepend(str(tmp_path))  # for the reference run below
    state = cluster.state
    env = {**cluster.env, "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), cluster.env.get("PYTHONPATH")]))}
    driver = subprocess.Popen([str(BIN / "dtrain"), "train", str(spec), f"runs_dir={runs}", "--address", cluster.gcs],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir, started = runs / "elastic", time.monotonic()

    def stages() -> list[dict]:
        return [e for e in read_metrics(run_dir) if e.get("event") == "stage"]

    def wait_for(what: str, ready, timeout: float = 150) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if driver.poll() is not None or time.monotonic() > deadline:
                driver.kill()
                out, err = driver.communicate()
                events = [e for e in read_metrics(run_dir) if e.get("event") != "step"]
                pytest.fail(f"no {what} after {time.monotonic() - started:.0f} s (rc {driver.returncode}); events "
                            f"{events}\nstdout {out[-3000:]}\nstderr {err[-3000:]}")
            time.sleep(0.5)

    def epochs_since(stage: dict) -> list[dict]:
        events = read_metrics(run_dir)
        return [e for e in events[events.index(stage):] if e.get("event") == "epoch"]

    def trained_at(workers: int) -> bool:  # the newest segment has this many workers and took a step
        segs, events = stages(), read_metrics(run_dir)
        return bool(segs) and segs[-1]["workers"] == workers and events[-1].get("event") in ("step", "epoch")

    try:
        wait_for("an intact checkpoint on 2 workers", lambda: trained_at(2) and len(stages()) == 1 and any(
            checkpoint_problem(c) is None for c in run_dir.glob("checkpoint_*")))  # every rank's files sealed
        _kill_tree(int((state / "worker1.pid").read_text()))  # node 1 gone: no drain, no goodbye
        killed = time.monotonic()
        wait_for("a restart on 1 worker after the node died",
                 lambda: len(stages()) >= 2 and stages()[-1]["workers"] == 1)
        shrink_s = time.monotonic() - killed
        wait_for("two epochs on 1 worker", lambda: len(epochs_since(stages()[-1])) >= 2)
        gate.touch()  # held on 1 worker until the run has grown
        # the joining node drains for up to 30 s on SIGTERM (a spot notice; the fixture's nodes drain for 1 s so
        # that teardown is quick, too short for a checkpoint on a loaded machine)
        add = subprocess.run(["bash", str(UP), "--add", "1"], env={**cluster.up_env,
                             "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "30"}, capture_output=True, text=True,
                             timeout=120)
        assert add.returncode == 0, add.stderr
        wait_for("a restart on 2 workers after a node joined", lambda: len(stages()) >= 3)
        gate.unlink()
        wait_for("step on 2 workers after a node joined", lambda: trained_at(2))
        os.kill(int((state / "worker2.pid").read_text()), signal.SIGTERM)  # node 2 is reclaimed: Ray drains it
        wait_for("the drained node's checkpoint",
                 lambda: any(e.get("event") == "preempted" for e in read_metrics(run_dir)), timeout=60)
        out, err = driver.communicate(timeout=300)
    finally:
        gate.unlink(missing_ok=True)
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:] + err[-3000:]
    assert "are being preempted" in out and "checkpointing at the next step boundary" in out, out
    events = read_metrics(run_dir)
    segs = [e for e in events if e.get("event") == "stage"]
    assert [s["workers"] for s in segs][:1] == [2] and [s["workers"] for s in segs][-2:] == [2, 1], segs
    assert 1 in [s["workers"] for s in segs[1:-1]], segs
    # every restart resumed from a checkpoint the run wrote; the drain's one is of the step the vote agreed on
    resumes = [e for e in events if e.get("event") == "resume"]
    assert len(resumes) == len(segs) - 1 and resumes[0]["step"] % 21 == 0 < resumes[0]["step"], resumes  # epochs'
    assert resumes[1]["step"] > resumes[0]["step"], resumes  # grew from a checkpoint written on 1 worker
    preempted = next(e for e in events if e.get("event") == "preempted")
    assert resumes[-1]["step"] == preempted["step"] and resumes[-1]["samples"] == preempted["samples"]
    summary = json.loads((run_dir / "summary.json").read_text())
    print(f"segments {[s['workers'] for s in segs]}, resumed at steps {[r['step'] for r in resumes]}; "
          f"on 1 worker {shrink_s:.0f} s after the node's SIGKILL")

    job = yaml.safe_load(ELASTIC_SPEC)  # uninterrupted, on 2 workers (checkpoints do not change the training)
    job.update(trainer={**job["trainer"], "num_workers": 2}, checkpoint={"every_n_epochs": 1000})
    full = spawn_workers(_built(job), tmp_path / "full", world=2)
    assert summary["steps"] == full["steps"]
    a, b = safe_load(tmp_path / "full" / "model.pt"), safe_load(run_dir / "model.pt")
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max abs weight difference from the uninterrupted 2-worker run: {diff:.3g}")
    assert diff <= ELASTIC_TOLERANCE


ELASTIC_TOLERANCE = 1e-3
"""Largest absolute difference of any final weight (of up to about 0.3) after the 840 Adam steps, most of them on 1
worker (the run ends on 1 worker after the drain): float32 reduction order, grown over the steps, and how much it
grows varies from run to run. Measured: 1.4e-6 and 1.7e-4 (two runs); uninterrupted 1-worker runs are 1.4e-6 (840
steps), 1.8e-5 (1260) and 4.4e-4 (1680) from the 2-worker run. The exact resume points are asserted separately
(each segment's step and sample count)."""


def _built(job: dict) -> dict:
    from omegaconf import OmegaConf

    from dtrain.config import build_job, to_dict

    return to_dict(build_job(OmegaConf.create(job)))
