"""Run directories in object storage, against a real S3-compatible server (moto's, on 127.0.0.1: the `s3` fixture in
tests/conftest.py): a 2-worker run writes its whole record under s3://bucket/prefix; a worker SIGKILLed mid-run
restarts from the bucket's newest intact checkpoint; `--resume` from the URI, with the newest checkpoint truncated in
the bucket, falls back to the previous one and ends bitwise equal to an uninterrupted run; `dtrain report s3://...`
draws the plots there; the fake credentials appear in nothing written; bad URIs are one line and exit 2."""

from __future__ import annotations

import json
import os
import uuid
import warnings

import pytest
import torch

from dtrain.cli import main
from dtrain.config import load_job, to_dict
from dtrain.engine.checkpoint import read_manifest, safe_load
from dtrain.launch.spawn import spawn_workers
from dtrain.launch.train import fit_job
from dtrain.tracking import read_metrics
from tests.conftest import FAKE_AWS
from tests.faults import KillAt
from tests.helpers import JOBS

pytestmark = pytest.mark.slow

JOB = str(JOBS / "mlp_digits.yaml")
# 21 steps an epoch; checkpoints every 5 steps and at each epoch's end. A constant
# learning rate and no early stopping: a run resumed with more epochs follows the longer run exactly.
OVERRIDES = ["model.hidden=[32]", "optim.scheduler=none", "trainer.early_stopping.monitor=null",
             "checkpoint.every_n_steps=5", "checkpoint.keep=4", "logging.progress=true"]
KILL_STEP = 17  # rank 1 is SIGKILLed here, mid-epoch, 5 s after the step (its uploads of steps 5-15 go on meanwhile)


@pytest.fixture(scope="module")
def record(s3, ray_session, tmp_path_factory):
    """Run `a` in the bucket (1 epoch, rank 1 SIGKILLed once at KILL_STEP, max_failures=1, W&B offline), its
    newest checkpoint then truncated in the bucket and the run resumed to 2 epochs from the URI by the command line;
    run `b`, 2 epochs uninterrupted in a local folder (local processes)."""
    tmp = tmp_path_factory.mktemp("objstore")
    prefix = f"dtrain-test/{uuid.uuid4().hex[:8]}/runs"
    uri = f"s3://{prefix}/a"
    saved = dict(os.environ)
    os.environ["WANDB_MODE"] = "offline"
    os.environ.pop("WANDB_DIR", None)  # W&B's offline run goes into the run dir: the bucket
    try:
        job = load_job(JOB, [f"runs_dir=s3://{prefix}", "name=a", "trainer.max_epochs=1", "trainer.max_failures=1",
                             *OVERRIDES])
        fit_job(job, worker_callbacks=[KillAt(1, KILL_STEP, tmp / "killed", delay_s=5)])
        killed = read_metrics_at(s3, f"{prefix}/a")
        before = checkpoints(s3, f"{prefix}/a", tmp / "before")
        newest = before[-1]
        with s3.open_output_stream(f"{prefix}/a/{newest.name}/model.pt") as f:  # cut the object short
            f.write((newest / "model.pt").read_bytes()[:1000])
        for lost in before[:-2]:  # older checkpoints gone from the bucket (Ray Train's own list still names them)
            s3.delete_dir(f"{prefix}/a/{lost.name}")
        rc_a = main(["train", uri, "trainer.max_epochs=2", "--resume"])
        # the same engine in 2 local processes (no Ray: its run is not what is tested here)
        spawn_workers(to_dict(load_job(JOB, [f"runs_dir={tmp / 'local'}", "name=b", "trainer.max_epochs=2",
                                             "logging.wandb.enabled=false", *OVERRIDES])), tmp / "local" / "b")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"s3": s3, "prefix": f"{prefix}/a", "uri": uri, "tmp": tmp, "killed": killed, "before": before,
            "rc": rc_a, "local": tmp / "local" / "b", "marker": tmp / "killed"}


def read_metrics_at(s3, path):
    with s3.open_input_stream(f"{path}/metrics.jsonl") as f:
        return [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]


def download(s3, path, to):
    """Every object under path into the folder `to`; returns {relative name: bytes}."""
    from pyarrow.fs import FileSelector, FileType

    found = {}
    for info in s3.get_file_info(FileSelector(path, recursive=True)):
        if info.type == FileType.File:
            with s3.open_input_stream(info.path) as f:
                found[info.path[len(path) + 1:]] = data = f.read()
            (to / info.path[len(path) + 1:]).parent.mkdir(parents=True, exist_ok=True)
            (to / info.path[len(path) + 1:]).write_bytes(data)
    return found


def checkpoints(s3, path, to):
    """The run's checkpoint folders in the bucket, downloaded into `to`, oldest first (by their manifests' step)."""
    download(s3, path, to)
    return sorted(to.glob("checkpoint_*/"), key=lambda p: (read_manifest(p) or {}).get("step", -1))


def test_a_killed_worker_restarts_from_the_buckets_newest_checkpoint(record):
    assert record["marker"].exists()  # rank 1 really was SIGKILLed
    resumes = [e for e in record["killed"] if e["event"] == "resume"]
    # From a checkpoint in the bucket (every 5 steps; the newest ones may still have been uploading when rank 1 died,
    # and are then passed over as incomplete), not from scratch.
    assert len(resumes) == 1 and 5 <= resumes[0]["step"] < KILL_STEP and resumes[0]["step"] % 5 == 0, resumes
    end = [e for e in record["killed"] if e["event"] == "end"]
    assert end and end[-1]["stop_reason"] == "completed" and end[-1]["epochs"] == 1


def test_resume_from_the_uri_skips_a_truncated_checkpoint_and_ends_bitwise_equal(record):
    assert record["rc"] == 0
    previous = read_manifest(record["before"][-2])["step"]
    events = read_metrics_at(record["s3"], record["prefix"])
    resumes = [e for e in events if e["event"] == "resume"]
    assert resumes[-1]["step"] == previous  # the truncated newest one (step 21) was passed over
    final = checkpoints(record["s3"], record["prefix"], record["tmp"] / "after")[-1]
    local = sorted((record["local"] / "checkpoints").glob("step_*/"), key=lambda p: read_manifest(p)["step"])[-1]
    assert read_manifest(final)["step"] == read_manifest(local)["step"] == 42
    a, b = safe_load(final / "model.pt"), safe_load(local / "model.pt")
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for idx, state in b["optimizer"]["state"].items():
        for key in state:
            assert torch.equal(a["optimizer"]["state"][idx][key], state[key]), (idx, key)


def test_the_whole_record_is_in_the_bucket_and_no_credential_in_it(record, tmp_path):
    files = download(record["s3"], record["prefix"], tmp_path)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report/report.md", "report/loss.png"):
        assert name in files, sorted(files)
    summary = json.loads(files["summary.json"])
    assert summary["epochs"] == 2
    # the worker-hours of both segments (the killed-and-restarted fit, then the resume), recorded in the bucket
    assert "cost.jsonl" in files and summary["cost"]["segments"] == 2 and summary["cost"]["cpu_hours"] > 0
    assert any(n.startswith("wandb/") and n.endswith(".wandb") for n in files), sorted(files)
    # checkpoint.keep=4 over both segments: the resumed run's end dropped the folders from before it (the truncated
    # one and any whose upload the killed rank cut off), which Ray's keep-count of the new segment does not cover
    folders = sorted({n.split("/")[0] for n in files if n.startswith("checkpoint_") and "/" in n})
    assert len(folders) == 4, folders
    for folder in folders:
        assert {f"{folder}/manifest_rank0.json", f"{folder}/manifest_rank1.json", f"{folder}/model.pt"} <= set(files)
    for name, data in files.items():
        for secret in (FAKE_AWS["AWS_SECRET_ACCESS_KEY"], FAKE_AWS["AWS_ACCESS_KEY_ID"]):
            assert secret.encode() not in data, name
    assert read_metrics(tmp_path) == read_metrics_at(record["s3"], record["prefix"])


def test_report_reads_and_writes_the_bucket(record, capsys):
    record["s3"].delete_dir(f"{record['prefix']}/report")
    assert main(["report", record["uri"]]) == 0
    assert f"{record['uri']}/report/report.md" in capsys.readouterr().out
    assert record["s3"].get_file_info(f"{record['prefix']}/report/metrics.png").size > 1000


@pytest.mark.parametrize("runs_dir, words", [
    ("s3://dtrain-no-such-bucket/runs", "runs_dir: cannot write to s3://dtrain-no-such-bucket/runs: the bucket "
                                         "does not exist"),
    ("nosuchscheme://bucket/runs", "runs_dir: no filesystem opens nosuchscheme://bucket/runs"),
    ("s3://AKIAFAKE:dtrain-fake-secret@dtrain-test/runs", "runs_dir: s3://dtrain-test/runs holds credentials"),
])
def test_bad_runs_dir_uri_is_one_line_and_exit_2(s3, runs_dir, words, capsys):
    assert main(["train", JOB, f"runs_dir={runs_dir}", "name=bad", "logging.wandb.enabled=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dtrain: error: {words}"), err
    assert "dtrain-fake-secret" not in err[0]


@pytest.fixture(scope="module")
def locked_s3():
    """A second moto server that checks credentials (after its first 5 requests, which set it up): a bucket
    `locked` and a user `reader` allowed only to read. Yields (endpoint, reader's key id, reader's secret)."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    import boto3

    from dtrain.launch.net import free_port

    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p",
                             url.rsplit(":", 1)[1]], env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "5"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        kw = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "setup",
              "aws_secret_access_key": "setup"}
        deadline = time.monotonic() + 60
        while True:
            try:
                boto3.client("s3", **kw).create_bucket(Bucket="locked")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                                                      "Resource": "*"}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        yield url, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("who, words", [("reader", "access denied"), ("stranger", "the access key is not known")])
def test_runs_dir_without_write_permission_or_with_unknown_credentials(locked_s3, who, words, monkeypatch, capsys):
    url, key_id, secret = locked_s3
    if who == "stranger":
        key_id, secret = "AKIADTRAINSTRANGER00", "dtrain-fake-secret-stranger"
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    assert main(["train", JOB, "runs_dir=s3://locked/runs", "name=bad", "logging.wandb.enabled=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"dtrain: error: runs_dir: cannot write to s3://locked/runs: {words}")
    assert secret not in err[0]


PBT_JOB = """\
model: {name: mlp, hidden: [16]}
data: {name: digits, batch_size: 64}
optim: {lr: 0.003, scheduler: none, warmup_steps: 0}
trainer: {num_workers: 1, max_epochs: 3, log_every_n_steps: 7}
logging: {wandb: {enabled: "false"}, progress: false}
tune: {metric: val/acc, mode: max, scheduler: pbt, perturbation_interval: 2, quantile_fraction: 0.5, num_samples: 2,
       synch: true, seed: 3, space: {optim.lr: "loguniform(0.001, 0.03)"}}
"""


def test_a_pbt_search_in_a_bucket_hands_over_checkpoints_resumes_and_its_best_job_trains(s3, ray_session, tmp_path,
                                                                                      capsys):
    """`dtrain tune` with runs_dir in the bucket, synchronous PBT, 2 trials at once (synchronous: however unevenly
    the trials start on a loaded machine, both reach each perturbation). Everything is in the bucket: Tune's state,
    job.yaml, results.csv, best.yaml, cost.json, every trial's runs. For each exploit Tune logged (pbt_global.txt):
    the taker's next segment starts from weights bitwise equal to one of the donor's checkpoints, at the donor's
    step, and every step it logs uses the taker's own perturbed lr (its config.yaml), not the donor's.
    `dtrain tune URI --resume` gives the same table; `dtrain train URI/best.yaml` trains the best values."""
    import csv
    import io

    prefix = f"dtrain-test/{uuid.uuid4().hex[:8]}/runs"
    job = tmp_path / "pbt.yaml"
    job.write_text(PBT_JOB)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["tune", str(job), f"runs_dir=s3://{prefix}", "name=pbt"]) == 0, capsys.readouterr().err[-3000:]
    assert not [str(w.message) for w in caught if "PBT" in str(w.message)]  # no advice dtrain cannot take
    out = capsys.readouterr().out
    assert f"[dtrain] results: s3://{prefix}/pbt/results.csv" in out, out[-2000:]
    files = download(s3, f"{prefix}/pbt", tmp_path / "pbt")
    for name in ("job.yaml", "results.csv", "best.yaml", "cost.json", "pbt_global.txt", "tuner.pkl"):
        assert name in files, sorted(files)
    rows = list(csv.DictReader(io.StringIO(files["results.csv"].decode())))
    assert len(rows) == 2 and all(r["status"] == "ok" and float(r["cpu_hours"]) > 0 for r in rows), rows
    assert all(r["run_dir"].startswith(f"s3://{prefix}/pbt/trials/") for r in rows), rows

    for name, data in files.items():  # Tune's state and pickles included
        for secret in (FAKE_AWS["AWS_SECRET_ACCESS_KEY"], FAKE_AWS["AWS_ACCESS_KEY_ID"]):
            assert secret.encode() not in data, name
    search = tmp_path / "pbt"
    exploits = [json.loads(line) for line in files["pbt_global.txt"].decode().splitlines() if line.strip()]
    assert len(exploits) == 1, exploits  # synchronous PBT: at epoch 2 the worse of the two trials exploits

    def trial_id(name: str) -> str:  # Tune's trial name starts with its index; dtrain names trial folders by id
        return next(p.name for p in (search / "trials").iterdir() if p.name.endswith(f"_{int(name.split('_')[0]):05d}"))

    trained = 0  # exploits whose segment trained steps with the new lr
    for taker_name, donor_name, _, _, donor_config, new_config in exploits:
        taker, donor = trial_id(taker_name), trial_id(donor_name)
        assert taker != donor and new_config["optim.lr"] != donor_config["optim.lr"]  # explored
        donor_weights = [safe_load(c / "model.pt")["model"] for c in (search / donor).glob("checkpoint_*")]
        # the taker's segment after this exploit: it started from one of the donor's checkpoints, with the new lr
        runs = [search / "trials" / taker / f"run{i.name[len('init'):]}" for i in (search / "trials" / taker).glob(
            "init*") if any(_same(safe_load(i / "model.pt")["model"], w) for w in donor_weights)]
        runs = [r for r in runs if load_job(r / "config.yaml").optim.lr == pytest.approx(new_config["optim.lr"])]
        assert runs, f"no segment of {taker} started from {donor}'s weights with lr {new_config['optim.lr']}"
        events = read_metrics(runs[0])
        resume = next((e for e in events if e.get("event") == "resume"), None)
        init = runs[0].parent / f"init{runs[0].name[len('run'):]}"
        assert resume is not None and resume["step"] == safe_load(init / "train_state.pt")["step"] > 0, resume
        lrs = [e["lr"] for e in events if e.get("event") == "step"]  # what the optimizer used at each logged step
        stage = next(e for e in events if e.get("event") == "stage")
        if resume["step"] == stage["epochs"] * stage["steps_per_epoch"]:  # exploited at the last perturbation:
            assert lrs == []  # the segment starts at the end, with no step left to train
            continue
        assert lrs and all(lr == pytest.approx(new_config["optim.lr"], rel=1e-6) for lr in lrs), (lrs, new_config)
        trained += 1
    assert trained, f"no exploit left a step to train: {exploits}"

    assert main(["tune", f"s3://{prefix}/pbt", "--resume"]) == 0, capsys.readouterr().err[-3000:]
    again = list(csv.DictReader(io.StringIO(download(s3, f"{prefix}/pbt", tmp_path / "again")["results.csv"].decode())))
    assert [(r["trial"], r["epochs"]) for r in again] == [(r["trial"], r["epochs"]) for r in rows]
    assert main(["train", f"s3://{prefix}/pbt/best.yaml", f"runs_dir={tmp_path / 'runs'}", "name=best",
                 "trainer.max_epochs=2"]) == 0
    trained = load_job(tmp_path / "runs" / "best" / "config.yaml")
    assert trained.optim.lr == pytest.approx(float(rows[0]["optim.lr"])) and trained.tune is None


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
