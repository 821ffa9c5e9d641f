"""W&B logging, read back from W&B's own offline files: one run per job (rank 0), values equal metrics.jsonl,
resumed runs keep the run id, the API key never lands in a file or the console."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dtrain.errors import ConfigError
from dtrain.report import write_report
from dtrain.tracking import SUMMARY_FILE, WANDB_ID_FILE, Tracker, read_metrics, wandb_mode, wandb_run_id
from tests.helpers import ROOT, small_job

FAKE_KEY = "dtrain-test-fake-key-5c1f0e9a7b"


def wandb_records(run_folder: Path) -> list:
    """The protobuf records of an offline run's .wandb file (W&B's LevelDB-style log: 32 KiB blocks, 7-byte
    record headers, records split FIRST/MIDDLE/LAST across blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_folder.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B", "not a W&B datastore file"
    records, pos, chunk, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def history(records: list) -> dict[int, dict]:
    """{_step: {key: value}} from the history records."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


def summary(records: list) -> dict:
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            out |= {"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update}
    return out


def one_of(records: list, kind: str):
    found = [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]
    assert len(found) == 1, f"expected one {kind} record, got {len(found)}"
    return found[0]


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """Offline W&B with a fake key; its staging, cache and settings folders kept inside tmp_path."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_DATA_DIR", "wb-data"), ("WANDB_CACHE_DIR", "wb-cache"), ("WANDB_CONFIG_DIR", "wb-cfg")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path


def test_mode_resolution_precedence():
    assert wandb_mode({"enabled": "false", "mode": "online"}, {"WANDB_API_KEY": "k"}) is None
    assert wandb_mode({"enabled": "auto"}, {"WANDB_API_KEY": "k"}) == "online"
    assert wandb_mode({"enabled": "auto"}, {"NETRC": "/nonexistent"}) == "offline"
    assert wandb_mode({"enabled": "auto"}, {"WANDB_MODE": "offline", "WANDB_API_KEY": "k"}) == "offline"
    assert wandb_mode({"enabled": "auto", "mode": "online"}, {"WANDB_MODE": "offline"}) == "online"
    assert wandb_mode({"enabled": "true", "mode": "disabled"}, {"WANDB_API_KEY": "k"}) is None
    assert wandb_mode({"enabled": "true"}, {"WANDB_MODE": "dryrun", "NETRC": "/nonexistent"}) == "offline"
    with pytest.raises(ConfigError, match="logging.wandb.enabled"):
        wandb_mode({"enabled": "true"}, {"NETRC": "/nonexistent"})


def test_engine_and_disabled_tracker_never_import_wandb(tmp_path):
    code = ("import sys; import dtrain.engine.loop, dtrain.launch.worker; from dtrain.tracking import Tracker; "
            "from tests.helpers import small_job; "
            "t = Tracker(sys.argv[1], small_job()); t.log({'event': 'step', 'step': 1, 'lr': 0.1}); t.close(); "
            "assert 'wandb' not in sys.modules, 'wandb was imported'")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, cwd=ROOT)
    assert read_metrics(tmp_path)[0]["lr"] == 0.1


def test_run_id_is_kept_in_the_run_dir(tmp_path):
    for name in ("a", "seg0", "seg1"):
        (tmp_path / name).mkdir()
    first, resumed = wandb_run_id(tmp_path / "a")
    assert not resumed and len(first) == 8 and wandb_run_id(tmp_path / "a") == (first, True)
    # dtrain tune's segments of one trial: different run dirs, one W&B run id (logging.wandb.id)
    assert wandb_run_id(tmp_path / "seg0", "trial_7") == ("trial_7", False)
    assert wandb_run_id(tmp_path / "seg1", "trial_7") == ("trial_7", False)
    assert wandb_run_id(tmp_path / "seg1", "trial_7") == ("trial_7", True)


@pytest.mark.slow
def test_offline_run_matches_metrics_and_resume_keeps_id(wandb_env, capfd):
    from dtrain.launch.spawn import spawn_workers

    tmp, run_dir = wandb_env, wandb_env / "run"
    over = {"logging.wandb.enabled": "true", "logging.wandb.mode": "offline", "logging.wandb.group": "search-a",
            "logging.wandb.name": "trial-7", "logging.wandb.tags": "[t1]", "logging.wandb.log_checkpoint": "true",
            "trainer.log_every_n_steps": 4, "trainer.max_epochs": 1}
    spawn_workers(small_job(**over), run_dir, world=2)

    folders = sorted((tmp / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, f"one W&B run per job (rank 0 only), found {[f.name for f in folders]}"
    run_id = (run_dir / WANDB_ID_FILE).read_text().strip()
    records = wandb_records(folders[0])
    run = one_of(records, "run")
    assert (run.run_id, run.run_group, run.display_name, list(run.tags)) == (run_id, "search-a", "trial-7", ["t1"])
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["model"]["name"] == "mlp" and config["trainer"]["log_every_n_steps"] == 4

    events, rows = read_metrics(run_dir), history(records)
    steps = [e for e in events if e["event"] == "step"]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert steps and epochs and {e["step"] for e in steps} <= set(rows)
    for e in steps:
        for key in ("train/loss", "train/acc", "train/grad_norm", "lr", "samples_per_s", "step_time_s"):
            assert math.isclose(rows[e["step"]][key], e[key], rel_tol=1e-9), (e["step"], key)
    for e in epochs:
        row = rows[e["step"]]
        assert math.isclose(row["val/acc"], e["val/acc"]) and math.isclose(row["train/loss_epoch"], e["train/loss"])
    end = json.loads((run_dir / SUMMARY_FILE).read_text())
    wb_summary = summary(records)
    for key, value in end["test"].items():
        assert math.isclose(wb_summary[key], value), key
    assert math.isclose(wb_summary["best/val/loss"], end["best"]["val/loss"]) and wb_summary["steps"] == end["steps"]
    artifact = one_of(records, "artifact")
    assert artifact.name == f"checkpoint-{run_id}" and artifact.type == "model" and "final" in artifact.aliases
    assert json.loads(artifact.metadata)["step"] == end["steps"]
    assert {"model.pt", "train_state.pt"} <= {c.path for c in artifact.manifest.contents}
    assert one_of(records, "exit").exit_code == 0
    report = write_report(run_dir).read_text()  # the offline report of the same real run
    assert f"| test/acc | {end['test']['test/acc']:.4f} |" in report

    # Resume with more epochs: a second offline folder carrying the same run id, continuing the step axis.
    spawn_workers(small_job(**over | {"trainer.max_epochs": 2}), run_dir, world=2, resume=True)
    folders = sorted((tmp / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(run_id) for f in folders), [f.name for f in folders]
    resumed = wandb_records(folders[1])
    assert one_of(resumed, "run").run_id == run_id
    assert min(history(resumed)) > max(rows), "the resumed run logs the steps after the checkpoint"

    out = capfd.readouterr()
    assert f"wandb sync {folders[0]}" in out.out and f"wandb sync --append {folders[1]}" in out.out
    leaks = [p for p in tmp.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaks and FAKE_KEY not in out.out + out.err, leaks


def test_tracker_defaults_to_run_dir_and_marks_failures(wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_DIR")
    run_dir = wandb_env / "run"
    job = small_job(**{"logging.wandb.enabled": "auto"})
    with pytest.raises(RuntimeError), Tracker(run_dir, job, echo=False) as tracker:
        tracker.log({"event": "step", "step": 3, "lr": 0.5, "train/loss": 1.25})
        raise RuntimeError("worker died")
    folders = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, "without WANDB_DIR the W&B folder lives in the run dir"
    records = wandb_records(folders[0])
    assert history(records)[3]["train/loss"] == 1.25
    assert one_of(records, "exit").exit_code == 1


def test_wandb_start_failure_is_fatal_only_when_enabled_is_true(wandb_env, capsys):
    job = small_job(**{"logging.wandb.enabled": "auto"})
    job["logging"]["wandb"]["id"] = "bad/id"  # past the config check: W&B itself refuses to start this run
    with Tracker(wandb_env / "auto", job, echo=False) as tracker:
        tracker.log({"event": "step", "step": 1, "lr": 0.1})
    assert tracker.wandb is None and "W&B is off for this run" in capsys.readouterr().out
    assert read_metrics(wandb_env / "auto")[0]["lr"] == 0.1
    job["logging"]["wandb"]["enabled"] = "true"
    with pytest.raises(ConfigError, match="logging.wandb: could not start a W&B run"):
        Tracker(wandb_env / "true", job)
