"""Bad input through the real command line: every malformed job spec, override or data file gives exit status 2 and
one `dtrain: error:` line naming what is wrong, with no traceback, and (for `train`) before any Ray is started."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.cli import main
from tests.helpers import JOBS, ROOT

JOB = str(JOBS / "mlp_digits.yaml")


def _write_files(d: Path) -> None:
    """The malformed jobs and data files the cases below point at."""
    (d / "broken.yaml").write_text("model: {name: mlp\ntrainer: [\n")
    (d / "list.yaml").write_text("- model\n- data\n")
    (d / "nomodel.yaml").write_text("data: {name: digits}\n")
    rng = np.random.default_rng(0)
    np.savez(d / "nox.npz", features=rng.normal(size=(20, 3)), y=np.arange(20) % 2)
    np.savez(d / "mismatch.npz", x=rng.normal(size=(20, 3)), y=np.arange(15) % 2)
    np.savez(d / "empty.npz", x=np.zeros((0, 3)), y=np.zeros(0, dtype=np.int64))
    (d / "corrupt.npz").write_bytes(b"PK\x03\x04 this is not really a zip archive")
    (d / "ragged.csv").write_text("1,2,0\n3,4,1\n5,1\n")
    (d / "words.csv").write_text("a,b,label\n1,2,0\n3,oops,1\n")
    (d / "empty.csv").write_text("\n\n")
    (d / "mnist").mkdir()
    (d / "runs" / "taken").mkdir(parents=True)
    (d / "runs" / "taken" / "config.yaml").write_text("model: {name: mlp}\n")
    (d / "afile").write_text("not a folder\n")


# (id, command line after `dtrain` ({d} = the scratch folder), what the one error line must contain)
CASES = [
    ("missing-job-file", "config {d}/nope.yaml", "nope.yaml: job file not found"),
    ("invalid-yaml", "config {d}/broken.yaml", "broken.yaml: not valid YAML"),
    ("yaml-not-a-mapping", "config {d}/list.yaml", "list.yaml: expected a mapping"),
    ("no-model-name", "config {d}/nomodel.yaml", "model.name: required"),
    ("unknown-model", "config JOB model.name=transformer", "transformer"),
    ("unknown-top-level-key", "config JOB epochs=3", "unknown key 'epochs'"),
    ("unknown-nested-key", "config JOB trainer.max_epoch=3", "unknown key 'trainer.max_epoch'"),
    ("unknown-model-field", "config JOB model.hiden=[8]", "model.hiden"),
    ("wrong-type-int", "config JOB trainer.max_epochs=ten", "trainer.max_epochs"),
    ("wrong-type-list-for-int", "config JOB data.batch_size=[3]", "data.batch_size"),
    ("negative-lr", "config JOB optim.lr=-0.1", "optim.lr: expected a number > 0"),
    ("unknown-optimizer", "config JOB optim.name=lbfgs", "optim.name"),
    ("unknown-strategy", "config JOB trainer.strategy=horovod", "trainer.strategy"),
    ("unknown-precision", "config JOB trainer.precision=16", "trainer.precision"),
    ("fraction-out-of-range", "config JOB data.val_fraction=1.5", "data.val_fraction"),
    ("negative-checkpoint-interval", "config JOB checkpoint.every_n_steps=-1", "checkpoint.every_n_steps"),
    ("override-without-equals", "config JOB trainer.max_epochs", "expected key=value"),
    ("unknown-data-set", "train JOB data.name=cifar", "data.name"),
    ("unknown-data-option", "train JOB data.options.noise=1", "data.options.noise"),
    ("path-for-bundled-data", "train JOB data.path={d}/x.npz", "data.path"),
    ("missing-data-file", "train JOB data.name=npz data.path={d}/nope.npz", "nope.npz: .npz file not found"),
    ("npz-without-x", "train JOB data.name=npz data.path={d}/nox.npz", "no array named 'x'"),
    ("npz-length-mismatch", "train JOB data.name=npz data.path={d}/mismatch.npz", "20 samples but 15 targets"),
    ("npz-corrupt", "train JOB data.name=npz data.path={d}/corrupt.npz", "corrupt.npz: not a readable .npz"),
    ("empty-data-set", "train JOB data.name=npz data.path={d}/empty.npz", "empty.npz: no samples"),
    ("csv-ragged-row", "train JOB data.name=csv data.path={d}/ragged.csv", "line 3 has 2 columns, expected 3"),
    ("csv-not-numeric", "train JOB data.name=csv data.path={d}/words.csv", "'oops' is not a number"),
    ("csv-empty", "train JOB data.name=csv data.path={d}/empty.csv", "empty.csv: empty CSV file"),
    ("mnist-folder-without-files", "train JOB data.name=mnist data.path={d}/mnist", "missing train-images"),
    ("batch-larger-than-data-set", "train JOB data.batch_size=100000", "data.batch_size: 100000 is larger"),
    ("more-workers-than-cpus", "train JOB trainer.num_workers=512", "trainer.num_workers: 512 workers"),
    ("gpu-on-a-cpu-machine", "train JOB trainer.use_gpu=true", "trainer.use_gpu"),
    ("fsdp-unknown-key", "train JOB trainer.strategy=fsdp trainer.fsdp.reshard=false",
     "unknown key 'trainer.fsdp.reshard'"),
    ("fsdp-offload-without-gpu", "train JOB trainer.strategy=fsdp trainer.fsdp.offload_params=true",
     "trainer.fsdp.offload_params: offloads from a CUDA GPU"),
    ("fsdp-fp16", "train JOB trainer.strategy=fsdp trainer.precision=fp16-mixed", "trainer.precision: fsdp runs 32"),
    ("compile-missing-backend", "train JOB trainer.compile.backend=tvm", "tvm needs the tvm package"),
    ("compile-unknown-backend", "config JOB trainer.compile.backend=xla9", "trainer.compile.backend: expected one of"),
    ("compile-unknown-mode", "config JOB trainer.compile.mode=fast", "trainer.compile.mode: expected one of"),
    ("compile-unknown-key", "config JOB trainer.compile.fast=true", "trainer.compile: expected true, false or a map"),
    ("compile-under-deepspeed", "train JOB trainer.strategy=deepspeed trainer.compile=true",
     "trainer.compile: not supported under trainer.strategy=deepspeed"),
    ("activation-checkpointing-number", "config JOB trainer.activation_checkpointing=3",
     "trainer.activation_checkpointing: expected true, false or a list of layer names"),
    ("resume-not-a-run-dir", "train {d} --resume", "not a run directory"),
    ("run-dir-exists", "train JOB name=taken", "run directory"),
    # hardening (issue 17): values that used to slip through
    ("infinite-lr", "config JOB optim.lr=1e400", "optim.lr: expected a finite number, got inf"),
    ("nan-momentum", "config JOB optim.momentum=nan", "optim.momentum: expected a finite number, got nan"),
    ("absolute-run-name", "config JOB name=/tmp/elsewhere", "name: expected a plain run name"),
    ("run-name-escapes", "train JOB name=../escape", "name: expected a plain run name"),
    ("env-interpolation", "config JOB name=${oc.env:HOME}", "name: '${oc.env:HOME}' reads an environment variable"),
    ("runs-dir-is-a-file", "train JOB runs_dir={d}/afile", "runs_dir: {d}/afile is a file or lies under one"),
    ("runs-dir-under-a-file", "train JOB runs_dir={d}/afile/sub", "runs_dir: {d}/afile/sub is a file or lies under"),
    ("model-too-big", "train JOB model.hidden=[100000000]", "model: mlp has 7,500,000,010 parameters"),
    ("zero-start-timeout", "config JOB trainer.start_timeout_s=0", "trainer.start_timeout_s"),
]
NEEDS_NO_GPU = {"gpu-on-a-cpu-machine", "fsdp-offload-without-gpu"}
PARAMS = [pytest.param(c, id=c[0], marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")]
                       if c[0] in NEEDS_NO_GPU else []) for c in CASES]
# Also run as a fresh `python -m dtrain` (about 3 CPU-seconds each, so a representative few): proves the real
# interpreter prints nothing else (no import-time warnings or tracebacks) and that no Ray is started.
IN_SUBPROCESS = {"missing-job-file", "unknown-nested-key", "missing-data-file", "csv-ragged-row",
                 "batch-larger-than-data-set", "more-workers-than-cpus", "gpu-on-a-cpu-machine", "model-too-big",
                 "runs-dir-is-a-file", "fsdp-unknown-key", "compile-missing-backend"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    _write_files(d)
    return d


def _argv(case, d: Path) -> list[str]:
    name, cmd, _ = case
    argv = [a.replace("{d}", str(d)).replace("JOB", JOB) for a in cmd.split()]
    if argv[0] == "train" and "--resume" not in argv:
        argv += [] if any(a.startswith("runs_dir=") for a in argv) else [f"runs_dir={d / 'runs'}"]
        argv += [] if any(a.startswith("name=") for a in argv) else [f"name={name}"]
    return argv


def _assert_one_clear_line(case, rc, err, d):
    name, _, expected = case
    expected = expected.replace("{d}", str(d))
    lines = err.strip().splitlines()
    assert rc == 2, (rc, err[-2000:])
    assert len(lines) == 1, err[-2000:]
    assert lines[0].startswith("dtrain: error: ") and "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert not (d / "runs" / name).exists()  # failed before a run directory (and any training) was started


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input_is_one_clear_line_and_exit_2(case, scratch, capfd, monkeypatch):
    """Through dtrain.cli.main, exactly what `dtrain` runs, in this process."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rc = main(_argv(case, scratch))
    _assert_one_clear_line(case, rc, capfd.readouterr().err, scratch)


@pytest.fixture(scope="module")
def subprocess_outcomes(scratch):
    """The IN_SUBPROCESS cases, each a real `python -m dtrain ...`, a few at a time."""
    env = {**os.environ, "WANDB_MODE": "disabled", "RAY_ADDRESS": ""}

    def run(case):
        try:
            proc = subprocess.run([sys.executable, "-m", "dtrain", *_argv(case, scratch)], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=180)
        except subprocess.TimeoutExpired:  # a case that is not caught early would start Ray and train
            return case[0], (None, "timed out: the bad input was not rejected")
        return case[0], (proc.returncode, proc.stderr)

    chosen = [c for c in CASES if c[0] in IN_SUBPROCESS and not (c[0] in NEEDS_NO_GPU and torch.cuda.is_available())]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, chosen))


@pytest.mark.parametrize("case", [p for p in PARAMS if p.values[0][0] in IN_SUBPROCESS])
def test_bad_input_through_a_real_dtrain_process(case, subprocess_outcomes, scratch):
    rc, err = subprocess_outcomes[case[0]]
    _assert_one_clear_line(case, rc, err, scratch)


def test_table_is_large_enough():
    assert len(CASES) >= 20
