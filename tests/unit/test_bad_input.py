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
MODULE_JOB = str(ROOT / "examples/user_project/jobs/smallnet_digits.yaml")  # a plain nn.Module through the adapter
RESNET_JOB = str(ROOT / "examples/user_project/jobs/resnet_digits.yaml")  # a CatalogModel by import path
TUNE_JOB = str(ROOT / "examples/user_project/jobs/tune_smallnet.yaml")  # a search over the module's args


def _write_files(d: Path) -> None:
    """The malformed jobs and data files the cases below point at."""
    (d / "broken.yaml").write_text("model: {name: mlp\ntrainer: [\n")
    (d / "list.yaml").write_text("- model\n- data\n")
    (d / "nomodel.yaml").write_text("data: {name: digits}\n")
    (d / "bare.yaml").write_text("model: {name: mlp}\ndata: {name: digits}\ntrainer: {num_workers: 2}\n")
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
    ("wrong-type-int", "config JOB trainer.max_epochs=ten", "trainer.max_epochs: expected an integer, got ten"),
    ("float-for-int", "config JOB trainer.max_epochs=1e3", "trainer.max_epochs: expected an integer, got 1000.0"),
    ("wrong-type-float", "config JOB optim.lr=fast", "optim.lr: expected a number, got fast"),
    ("wrong-type-bool", "config JOB checkpoint.background=maybe",
     "checkpoint.background: expected true or false, got maybe"),
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
    ("probe-without-labels", "train JOB data.name=sunspots trainer.linear_probe=true",
     "trainer.linear_probe: needs a data set with class labels"),
    ("probe-of-streamed-data", "train JOB data.name=parquet data.path={d}/rows trainer.linear_probe=true",
     "trainer.linear_probe: expected false with streamed data"),
    ("path-for-bundled-data", "train JOB data.path={d}/x.npz", "data.path"),
    ("local-with-address", "train JOB --local --address 127.0.0.1:9",
     "--local runs the workers on this machine without Ray; it takes no --address"),
    ("local-streamed-data", "train JOB --local data.name=parquet data.path={d}/rows",
     "data.name: parquet streams through Ray Data; --local takes in-memory data"),
    ("local-runs-in-a-bucket", "train JOB --local runs_dir=s3://bucket/runs",
     "runs_dir: s3://bucket/runs: a run directory in object storage needs Ray; --local takes"),
    ("local-elastic-range", "train JOB --local trainer.num_workers=[1,2] data.global_batch_size=64",
     "trainer.num_workers: an elastic range [1, 2] needs Ray; --local takes"),
    ("local-max-failures", "train JOB --local trainer.max_failures=2", "trainer.max_failures: 2: restarts need Ray"),
    ("local-more-workers-than-cpus", "train JOB --local trainer.num_workers=64 data.batch_size=8",
     "trainer.num_workers: 64 workers x 1.0 CPUs need 64 CPUs, this machine has"),
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
    ("global-batch-not-split", "config JOB data.global_batch_size=33 trainer.num_workers=2",
     "data.global_batch_size: 33 cannot be split evenly among 2 workers"),
    ("global-batch-under-batch-descent", "config JOB data.global_batch_size=32 optim.descent=batch",
     "data.global_batch_size: expected null under optim.descent=batch"),
    ("global-batch-larger-than-data-set", "train JOB data.global_batch_size=100000",
     "data.global_batch_size: 100000 is larger"),
    ("elastic-min-above-max", "config JOB trainer.num_workers=[3,2] data.global_batch_size=60",
     "trainer.num_workers: expected [min, max] with min <= max, got [3, 2]"),
    ("elastic-min-below-one", "config JOB trainer.num_workers=[0,2] data.global_batch_size=60",
     "trainer.num_workers: expected [min, max] with min >= 1, got [0, 2]"),
    ("elastic-without-global-batch", "config JOB trainer.num_workers=[1,2]",
     "data.global_batch_size: expected a number with an elastic trainer.num_workers [1, 2]"),
    ("elastic-global-batch-not-split", "train JOB trainer.num_workers=[4,6] data.global_batch_size=7",
     "data.global_batch_size: 7 cannot be split evenly among any of 4-6 workers"),
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
    ("nan-swish-beta", "config JOB model.swish_beta=nan", "model.swish_beta: expected a finite number, got nan"),
    ("absolute-run-name", "config JOB name=/tmp/elsewhere", "name: expected a plain run name"),
    ("run-name-escapes", "train JOB name=../escape", "name: expected a plain run name"),
    ("env-interpolation", "config JOB name=${oc.env:HOME}", "name: '${oc.env:HOME}' reads an environment variable"),
    ("runs-dir-is-a-file", "train JOB runs_dir={d}/afile", "runs_dir: {d}/afile is a file or lies under one"),
    ("runs-dir-under-a-file", "train JOB runs_dir={d}/afile/sub", "runs_dir: {d}/afile/sub is a file or lies under"),
    ("model-too-big", "train JOB model.hidden=[100000000]", "model: mlp has 7,500,000,010 parameters"),
    ("zero-start-timeout", "config JOB trainer.start_timeout_s=0", "trainer.start_timeout_s"),
    # the user's own code (examples/user_project and tests/unit/byo_models.py), named by import path
    ("model-path-does-not-import", "config JOB model.name=nopkg.nets:Net",
     "model.name: cannot import 'nopkg.nets': no module named 'nopkg'"),
    ("model-path-without-attr", "config {res} model.name=mynets.resnet:TinyResNett",
     "model.name: module 'mynets.resnet' has no attribute 'TinyResNett'"),
    ("model-path-not-a-class", "config {res} model.name=mynets.losses:smoothed_cross_entropy",
     "model.name: mynets.losses:smoothed_cross_entropy is a function, expected a CatalogModel subclass"),
    ("plain-module-as-model-name", "config {res} model.name=mynets.nets:SmallNet",
     "not a dtrain.models.CatalogModel subclass (a plain nn.Module trains through"),
    ("model-config-not-a-dataclass", "config {d}/bare.yaml model.name=tests.unit.byo_models:NotADataclassConfig",
     "model.name: tests.unit.byo_models:NotADataclassConfig: NotADataclassConfig.Config must be a dataclass"),
    ("model-config-unknown-field", "config {res} model.depth=3", "unknown key 'model.depth'"),
    ("model-config-own-check", "config {res} model.channels=6", "model.channels: expected a multiple of 4, got 6"),
    ("forward-returns-bare-tensor", "train {d}/bare.yaml model.name=tests.unit.byo_models:Bare",
     "model.name: forward(batch) returned Tensor, expected a dtrain.models.StepOutput(loss, metrics)"),
    ("model-constructor-raises", "train {d}/bare.yaml model.name=tests.unit.byo_models:Exploding",
     "model.name: building tests.unit.byo_models:Exploding failed: ValueError: no GPU-free version"),
    ("module-target-missing", "config {mod} model.target=mynets.nets:Nope",
     "model.target: module 'mynets.nets' has no attribute 'Nope'"),
    ("module-target-not-callable", "config {mod} model.target=tests.unit.byo_models:NOT_CALLABLE",
     "model.target: expected a class or function at tests.unit.byo_models:NOT_CALLABLE, got 'int'"),
    ("module-arg-rejected", "config {mod} model.args.depth=3",
     "model.args.depth: mynets.nets:SmallNet takes no argument 'depth' (it takes: input_shape, num_classes, width"),
    ("module-constructor-raises", "train {mod} model.args.width=-4", "model.args: mynets.nets:SmallNet(...) failed"),
    ("tune-space-arg-rejected", "tune {tune} tune.space.model.args.depth=choice([2])",
     "tune.space.model.args.depth: 2 does not fit the job: model.args.depth: mynets.nets:SmallNet takes no argument"),
    ("unknown-loss", "config {mod} model.loss=hinge",
     "model.loss: expected one of bce_logits, cross_entropy, mse, or an import path module:function, got 'hinge'"),
    ("loss-path-does-not-import", "config {mod} model.loss=mynets.lossez:fn", "model.loss: cannot import"),
    ("loss-does-not-fit-output", "train {mod} model.loss=mse", "model.loss: on the network's output failed"),
    ("unknown-metric", "config {mod} model.metrics=[f1]", "model.metrics: expected names among acc, mae"),
    ("data-path-does-not-import", "train JOB data.name=mynets.dataz:spirals",
     "data.name: cannot import 'mynets.dataz'"),
    ("data-path-not-callable", "train JOB data.name=tests.unit.byo_models:NOT_CALLABLE",
     "data.name: expected a function returning dtrain.data.Arrays"),
    ("data-loader-wrong-return", "train JOB data.name=tests.unit.byo_models:dict_loader",
     "data.name: tests.unit.byo_models:dict_loader returned dict, expected dtrain.data.Arrays"),
    ("data-loader-fails", "train JOB data.name=tests.unit.byo_models:failing_loader",
     "data.name: tests.unit.byo_models:failing_loader failed: FileNotFoundError"),
    ("data-loader-unknown-option", "train {mod} data.name=mynets.data:spirals data.options.size=3",
     "data.options.size: mynets.data:spirals takes no argument 'size' (it takes: n, noise, seed)"),
    ("cost-negative", "config JOB cost.per_gpu_hour=-1", "cost.per_gpu_hour: expected a number >= 0 or null"),
    ("cost-infinite", "config JOB cost.per_cpu_hour=1e400", "cost.per_cpu_hour: expected a finite number"),
    ("budget-not-positive", "tune {tune} tune.budget.gpu_hours=0",
     "tune.budget.gpu_hours: expected a finite number > 0 or null"),
    ("budget-unknown-key", "tune {tune} tune.budget.hours=3", "tune: unknown key 'budget.hours'"),
    # values that trained, or failed with a traceback, before they were checked
    ("zero-width-layer", "config JOB model.hidden=[64,0]",
     "model.hidden: expected a list of integers >= 1, got [64, 0]"),
    ("negative-width-layer", "config {jobs}/cnn_digits.yaml model.hidden=[-3]",
     "model.hidden: expected a list of integers >= 1, got [-3]"),
    ("zero-pretrain-epochs", "config {jobs}/dbn_digits.yaml model.pretrain_epochs=0",
     "model.pretrain_epochs: expected an integer >= 1 or null (trainer.max_epochs), got 0"),
    ("negative-finetune-lr", "config {jobs}/deep_autoencoder_digits.yaml model.finetune_lr=-0.1",
     "model.finetune_lr: expected a number > 0 or null (optim.lr), got -0.1"),
    ("zero-cd-k", "config {jobs}/deep_autoencoder_digits.yaml model.cd_k=0", "model.cd_k: expected an integer >= 1"),
    ("zero-cpus-per-worker", "config JOB trainer.cpus_per_worker=0", "trainer.cpus_per_worker: expected a number > 0"),
    ("zero-nonfinite-steps", "config JOB trainer.max_nonfinite_steps=0",
     "trainer.max_nonfinite_steps: expected an integer >= 1, got 0"),
    ("negative-min-delta", "config JOB trainer.early_stopping.min_delta=-1",
     "trainer.early_stopping.min_delta: expected a number >= 0"),
    ("momentum-out-of-range", "config JOB optim.momentum=1.5", "optim.momentum: expected a number in [0, 1), got 1.5"),
    ("zero-step-size", "config JOB optim.step_size=0", "optim.step_size: expected an integer >= 1, got 0"),
    ("monitor-not-logged", "train JOB trainer.early_stopping.monitor=val/accuracy",
     "trainer.early_stopping.monitor: expected a metric this run logs (train/loss, train/acc, val/loss, val/acc), "
     "got 'val/accuracy'"),
    ("monitor-without-validation", "train JOB data.val_fraction=0",
     "trainer.early_stopping.monitor: expected a metric this run logs (train/loss, train/acc), got 'val/acc'"),
    ("monitor-of-another-model", "train {jobs}/autoencoder_digits.yaml trainer.early_stopping.monitor=val/acc",
     "expected a metric this run logs (train/loss, train/mse, train/sq_error, val/loss, val/mse, val/sq_error)"),
    ("monitor-of-user-module", "train {mod} trainer.early_stopping.monitor=val/mae",
     "trainer.early_stopping.monitor: expected a metric this run logs (train/loss, train/acc, val/loss, val/acc)"),
    ("tune-metric-not-logged", "tune {jobs}/tune_mlp_digits.yaml tune.metric=val/accuracy",
     "tune.metric: expected a metric this run logs (train/loss, train/acc, val/loss, val/acc), got 'val/accuracy'"),
    ("tune-metric-of-one-candidate", "tune {tune} tune.space.model.metrics=choice([[acc],[]])",
     "tune.space.model.metrics: [] does not fit the job: tune.metric: expected a metric this run logs "
     "(train/loss, val/loss), got 'val/acc'"),
    ("negative-data-seed", "config JOB data.seed=-1", "data.seed: expected an integer >= 0, got -1"),
    ("empty-runs-dir", "config JOB runs_dir=", "runs_dir: expected a value, got an empty or null one"),
    ("null-section", "config JOB trainer=null", "trainer: expected a value, got an empty or null one"),
    ("stream-field-for-in-memory-data", "train JOB data.features=[a,b]",
     "data.features: read only by streamed data (parquet, images, csv or npz with data.stream: true), not by the "
     "in-memory digits (its options, in data.options: image); got ['a', 'b']"),
    ("csv-target-outside-options", "train JOB data.name=csv data.path={d}/words.csv data.target=b",
     "data.target: read only by streamed data (parquet, images, csv or npz with data.stream: true), not by the "
     "in-memory csv (its options, in data.options: target, header, delimiter, task); got 'b'"),
    ("convert-into-a-file", "data convert digits {d}/afile", "DEST: {d}/afile is a file or lies under one"),
    ("convert-under-a-file", "data convert digits {d}/afile/sub", "DEST: {d}/afile/sub is a file or lies under one"),
    ("preflight-bad-memory-limit", "preflight JOB --memory-limit lots",
     "--memory-limit: expected a size such as 2GiB or 800MB, got 'lots'"),
]
NEEDS_NO_GPU = {"gpu-on-a-cpu-machine", "fsdp-offload-without-gpu"}
PARAMS = [pytest.param(c, id=c[0], marks=[pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")]
                       if c[0] in NEEDS_NO_GPU else []) for c in CASES]
# Also run as a fresh `python -m dtrain` (about 3 CPU-seconds each, so one case per stage that rejects input: job
# file, data, resources, model size, user code): proves the real interpreter prints nothing else (no import-time
# warnings or tracebacks) and that no Ray is started.
IN_SUBPROCESS = {"missing-job-file", "csv-ragged-row", "more-workers-than-cpus", "model-too-big",
                 "model-path-does-not-import"}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_input")
    _write_files(d)
    return d


def _argv(case, d: Path) -> list[str]:
    name, cmd, _ = case
    jobs = {"{d}": str(d), "{jobs}": str(JOBS), "JOB": JOB, "{mod}": MODULE_JOB, "{res}": RESNET_JOB,
            "{tune}": TUNE_JOB}
    argv = cmd.split()
    for placeholder, value in jobs.items():
        argv = [a.replace(placeholder, value) for a in argv]
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


def test_every_case_is_run_under_its_own_name():
    """A duplicated id would hide a case behind another; a name in the subsets that matches no case would silently
    drop it from the subprocess run or the GPU skip."""
    names = [c[0] for c in CASES]
    assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    assert (IN_SUBPROCESS | NEEDS_NO_GPU) - set(names) == set()


def test_overrides_after_an_option_are_overrides_and_anything_else_is_refused(capsys):
    """The documented resume at another worker count, `dtrain train runs/x --resume trainer.num_workers=1`: argparse
    leaves what follows --resume over; it is the overrides. A stray word there is still a usage error (exit 2)."""
    from dtrain.cli import parse_args

    args = parse_args(["train", "runs/x", "a=1", "--resume", "trainer.num_workers=1", "trainer.max_epochs=3"])
    assert args.job == "runs/x" and args.resume
    assert args.overrides == ["a=1", "trainer.num_workers=1", "trainer.max_epochs=3"]
    with pytest.raises(SystemExit) as exit_:
        parse_args(["train", "runs/x", "--resume", "stray"])
    (line,) = capsys.readouterr().err.strip().splitlines()  # one line, with the command's usage
    assert exit_.value.code == 2
    assert line.startswith("dtrain: error: unrecognized arguments: stray; usage: dtrain train ")


def test_an_address_where_nothing_answers_is_one_line_at_once(scratch):
    """`--address HOST:PORT` with no cluster there: Ray's own connect retries for minutes, then raises a traceback.
    (A real process: in this one a Ray may already be connected.)"""
    case = ("dead-address", "train JOB --address 127.0.0.1:9", "--address 127.0.0.1:9: nothing answers there")
    proc = subprocess.run([sys.executable, "-m", "dtrain", *_argv(case, scratch)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "WANDB_MODE": "disabled", "RAY_ADDRESS": ""})
    _assert_one_clear_line(case, proc.returncode, proc.stderr, scratch)


@pytest.mark.parametrize("command", ["train", "tune", "config", "preflight", "submit"])
def test_a_missing_job_is_named_alone_not_with_the_optional_overrides(command, capsys):
    from dtrain.cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args([command])
    assert exit_.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"dtrain: error: the following arguments are required: job; usage: dtrain {command} ")


@pytest.mark.parametrize(("override", "expected"), [
    ("tune.num_samples=20", "tune.num_samples: a resumed search continues as it started, with tune.num_samples=8, "
                            "got 20; start a new search to change it"),
    ("tune.space.optim\\.lr=uniform(0.1,0.2)", "tune.space.optim.lr: a resumed search continues as it started"),
    ("model.dropout=0.3", "model.dropout: a resumed search continues from its trials' checkpoints, which were trained "
                          "with model.dropout=0.0, got 0.3; start a new search to change it")])
def test_a_search_resumed_with_a_changed_tune_section_or_model_is_one_line_and_loses_nothing(override, expected,
                                                                                                 tmp_path, capsys):
    """Ray Tune restores a search as it started (space, search algorithm, scheduler, budget) and its trials resume
    from their checkpoints: `dtrain tune runs/<search> --resume` with an override of those is refused before Ray
    starts, and the search folder is left as it was."""
    from omegaconf import OmegaConf

    from dtrain.config import load_job

    search = tmp_path / "runs" / "hpo"
    search.mkdir(parents=True)
    spec = OmegaConf.to_yaml(load_job(JOBS / "tune_mlp_digits.yaml", [f"runs_dir={tmp_path / 'runs'}", "name=hpo"]))
    (search / "job.yaml").write_text(spec)
    assert main(["tune", str(search), "--resume", "logging.progress=false", override]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith(f"dtrain: error: {expected}"), err
    assert [p.name for p in search.iterdir()] == ["job.yaml"] and (search / "job.yaml").read_text() == spec


@pytest.mark.parametrize(("argv", "expected"), [
    (["data", "convert", "digits", "out", "--rows-per-file", "0"],
     "argument --rows-per-file: expected an integer >= 1, got '0'"),
    (["up", "--num-cpus", "0"], "argument --num-cpus: expected an integer >= 1, got '0'"),
    (["up", "--num-gpus", "-1"], "argument --num-gpus: expected an integer >= 0, got '-1'")])
def test_counts_given_as_options_are_checked_by_the_parser(argv, expected, capsys):
    """A head with no CPU, or Parquet files of no rows, would start and then fail (or hang): refused as usage."""
    from dtrain.cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    (line,) = capsys.readouterr().err.splitlines()
    assert exit_.value.code == 2 and line.startswith(f"dtrain: error: {expected}; usage: dtrain {argv[0]} ")


@pytest.mark.parametrize("existed", [False, True])
def test_a_conversion_that_fails_leaves_its_destination_as_it_was(existed, tmp_path, capsys):
    dest = tmp_path / "out"
    if existed:
        dest.mkdir()
    assert main(["data", "convert", "npz", str(dest), f"data.path={tmp_path}/no.npz"]) == 2
    assert capsys.readouterr().err == f"dtrain: error: {tmp_path}/no.npz: .npz file not found\n"
    assert dest.is_dir() == existed and not (existed and any(dest.iterdir()))
