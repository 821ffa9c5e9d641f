"""The `dtrain` command line: train | config | models (tune, submit, jobs, report plug in beside them)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlparse

from omegaconf import OmegaConf

from dtrain.errors import DtrainError
from dtrain.storage import RunStore, is_uri, join, read_text, split


def _load(job_path: str, overrides: list[str]):
    from dtrain.config import load_job

    if is_uri(job_path):  # a job file in object storage (a search's best.yaml, a run's config.yaml)
        folder, name = split(job_path)
        text = RunStore(folder, key="job").read_bytes(name)
        if text is None:
            raise DtrainError(f"{job_path}: job file not found")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / name).write_bytes(text)
            return _load(str(Path(tmp) / name), overrides)
    job = load_job(job_path, overrides)
    if not job.name:
        job.name = f"{Path(job_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    return job


def cmd_train(args: argparse.Namespace) -> int:
    from dtrain.launch.train import fit_job, run_dir_for

    if args.local and args.address:
        raise DtrainError("--local runs the workers on this machine without Ray; it takes no --address")
    if args.resume:
        job = _load_run(args.job, "config.yaml", args.overrides)
        _refuse_checkpoint_changes(_load_run(args.job, "config.yaml", []), job)
        _say_if_nothing_to_resume(run_dir_for(job))
    else:
        job = _load(args.job, args.overrides)
    local = _runs_locally(args, job)
    if local:
        from dtrain.launch.spawn import check_local_run, fit_local, start_fork_server

        check_local_run(job)
        start_fork_server(job.trainer.strategy)  # the workers' imports, while the checks below run
    data = _check_buildable(job, args.address, shared=local)  # the local ranks read this copy
    check_trackers(job)
    if local:
        summary = fit_local(job, resume=args.resume, data=data)
    else:
        summary = fit_job(job, address=args.address, resume=args.resume, data=data)
    run_dir = run_dir_for(job)
    print(f"[dtrain] run finished: {run_dir}")
    for key, value in sorted(summary.get("test", {}).items()):
        print(f"[dtrain] {key} = {value:.4f}")
    print(f"[dtrain] metrics: {join(run_dir, 'metrics.jsonl')}  summary: {join(run_dir, 'summary.json')}")
    from dtrain.report import write_report

    print(f"[dtrain] report (plots + summary): {write_report(run_dir)}")
    return 0


def _runs_locally(args: argparse.Namespace, job) -> bool:
    """Whether `dtrain train` runs the workers as local processes (dtrain.launch.spawn) rather than through Ray.
    --local and --ray decide; else Ray where it is already there (--address, RAY_ADDRESS, a Ray this process joined,
    a head kept by `dtrain up`) or where the job needs it (dtrain.launch.spawn.ray_needed), and local processes
    otherwise: an embedded Ray would be most of a short run's start-up and bring nothing on one machine."""
    from dtrain.launch import local_head
    from dtrain.launch.spawn import ray_needed

    if args.local or args.ray:
        return args.local
    ray = sys.modules.get("ray")
    if args.address or os.environ.get("RAY_ADDRESS") or (ray and ray.is_initialized()) or local_head.running_address():
        return False
    reason = ray_needed(job)
    if reason is not None:
        print(f"[dtrain] starting Ray on this machine: {reason}", flush=True)
        return False
    print("[dtrain] the workers run as processes on this machine (no Ray is running; `dtrain up` keeps one for runs "
          "to use, --ray starts one for this run)", flush=True)
    return True


def _load_run(folder: str, job_file: str, overrides: list[str]):
    """The job of the run (or search) folder given to --resume: a local path or a URI in object storage."""
    what, hint = ("run", "runs/<name>") if job_file == "config.yaml" else ("search", "runs/<search>")
    if is_uri(folder):
        if RunStore(folder, key=f"{what} directory").read_bytes(job_file) is None:
            raise DtrainError(f"{folder}: not a {what} directory (no {job_file}); --resume takes {hint}")
        job = _load(str(join(folder, job_file)), overrides)
        job.runs_dir, job.name = split(folder)
        return job
    if not (Path(folder) / job_file).is_file():
        raise DtrainError(f"{folder}: not a {what} directory (no {job_file}); --resume takes {hint}")
    job = _load(str(Path(folder) / job_file), overrides)
    _located_at(job, Path(folder))
    return job


FIXED_ON_RESUME = ("model.", "optim.", "trainer.strategy", "data.name", "data.path", "data.options", "data.target",
                   "data.features")
"""What a resumed run's checkpoint was trained with: an override of these on --resume is refused (the optimizer's
state and schedule come from the checkpoint, so a new optim.lr would be ignored; a new model would not load)."""


def _refuse_checkpoint_changes(trained, resumed, search: bool = False) -> None:
    """One line for the first override of what a resumed run's checkpoint holds; for a search, also of its tune
    section (Ray Tune restores the search as it started: its space, search algorithm, scheduler and budget)."""
    from omegaconf import OmegaConf

    def flat(node, prefix=""):
        if isinstance(node, dict):
            return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: node}

    before, after = flat(OmegaConf.to_container(trained)), flat(OmegaConf.to_container(resumed))
    what, fixed = ("search", (*FIXED_ON_RESUME, "tune.")) if search else ("run", FIXED_ON_RESUME)
    held = "its trials' checkpoints, which were trained" if search else "its checkpoint, which was trained"
    for key in sorted(after.keys() | before.keys()):
        if key.startswith(fixed) and before.get(key) != after.get(key):
            source = "as it started, with" if key.startswith("tune.") else f"from {held} with"
            raise DtrainError(f"{key}: a resumed {what} continues {source} {key}={before.get(key)!r}, got "
                              f"{after.get(key)!r}; start a new {what} to change it")


def _say_if_nothing_to_resume(run_dir: Path | str) -> None:
    """--resume of a run that was stopped before its first checkpoint starts it again from step 0: say so."""
    from dtrain.engine.checkpoint import run_checkpoints

    if is_uri(str(run_dir)):
        found = RunStore(str(run_dir), key="run directory").folders("checkpoint_")
    else:
        found = run_checkpoints(Path(run_dir))
    if not found:
        print(f"[dtrain] {run_dir} has no checkpoint yet: the run starts again from step 0", flush=True)


def _located_at(job, folder: Path) -> None:
    """A resumed run or search continues in the folder given on the command line (it may have been moved or
    copied), not where its config.yaml says it was created."""
    folder = folder.expanduser().resolve()
    job.runs_dir, job.name = str(folder.parent), folder.name


def _check_buildable(job, address: str | None = None, tune_metric: str | None = None, shared: bool = False):
    """Load the data and build the model once on the driver, so bad input fails fast and clearly, before Ray.
    The model is built on the meta device (nothing is allocated), which also tells whether it fits this machine
    when Ray runs here, and steps once, which tells the metrics the run logs (early stopping's monitor and
    dtrain tune's metric must be among them). Returns the loaded data, which `dtrain train` hands to the workers
    (shared: in shared memory, for the local launcher's ranks; see load_data)."""
    import torch

    from dtrain.config import to_objects
    from dtrain.data import load_data
    from dtrain.data.stream_source import streams
    from dtrain.engine.loop import check_watched_metrics
    from dtrain.models import build_model

    obj = to_objects(job)
    streamed = streams(obj.data)
    if streamed:  # only the files' metadata is read here
        data = _check_stream(obj)
    else:
        data = load_data(obj.data, shared=shared)
        if obj.trainer.linear_probe:
            from dtrain.launch.probe import check_probe

            check_probe(data)
        n_train = len(data.train[0])
        if obj.data.global_batch_size is not None and obj.data.global_batch_size > n_train:
            raise DtrainError(f"data.global_batch_size: {obj.data.global_batch_size} is larger than the training "
                              f"set ({n_train} samples after the val/test split)")
        if obj.optim.descent == "minibatch" and obj.data.batch_size > n_train:
            raise DtrainError(f"data.batch_size: {obj.data.batch_size} is larger than the training set "
                              f"({n_train} samples after the val/test split)")
    with torch.device("meta"):
        model = build_model(obj.model, data.meta)
    if address is None:
        from dtrain.launch.train import check_model_fits

        check_model_fits(sum(p.numel() for p in model.parameters()), job)
    if not streamed:  # one step on two samples, which also proves the user's code works
        check_watched_metrics(obj.model, data, obj.trainer.early_stopping.monitor, tune_metric)
    return data


def _check_stream(obj):
    """A streamed data set: the files' columns and row counts, from their metadata (dtrain.data.stream_source)."""
    from dtrain.data.stream_images import describe_images
    from dtrain.data.stream_source import describe

    if obj.optim.descent == "batch":
        raise DtrainError("optim.descent: batch (the whole training set per step) cannot stream; use minibatch")
    return (describe_images if obj.data.name == "images" else describe)(obj.data)


def check_trackers(job) -> None:
    """Before Ray starts: a tracker that is enabled=true and cannot work is an error; an enabled=auto one is
    switched off for this run with one warning line."""
    from dtrain.config import to_dict
    from dtrain.tracking import preflight
    from dtrain.tracking.mlflow_sink import mlflow_settings

    settings = mlflow_settings(to_dict(job))
    # a URI from MLFLOW_TRACKING_URI travels with the job (Ray workers may not have the variable), unless it holds
    # a password (config.yaml must not)
    if settings is not None and urlparse(settings["tracking_uri"]).password is None:
        job.logging.mlflow.tracking_uri = settings["tracking_uri"]
    for section, reason in preflight(to_dict(job)).items():
        print(f"[dtrain] warning: {reason}; the run goes on without it", flush=True)
        job.logging[section].enabled = "false"


def _in_memory_only(job, command: str) -> None:
    from dtrain.data.stream_source import streams

    if streams(job.data):
        where = "`dtrain train` and `dtrain tune`" if job.data.name == "parquet" else "`dtrain train`"
        raise DtrainError(f"data.name: {job.data.name} streams through {where} only; dtrain {command} does not "
                          "stream yet (docs/streaming.md)")


def cmd_preflight(args: argparse.Namespace) -> int:
    from dtrain.launch.preflight import format_report, parse_bytes, run_preflight

    job = _load(args.job, args.overrides)
    _in_memory_only(job, "preflight")
    limit = parse_bytes(args.memory_limit) if args.memory_limit else None
    problems, data = [], None
    for check in (lambda: _check_buildable(job, args.address), lambda: check_trackers(job)):
        try:
            data = check() or data
        except DtrainError as err:  # every problem is reported, not only the first
            problems.append(str(err))
    report = run_preflight(job, data, address=args.address, memory_limit=limit)
    for line in format_report(report, job):
        print(line)
    problems += report.problems
    for problem in problems:
        print(f"dtrain: error: {problem}", file=sys.stderr)
    if problems:
        return 2
    print(f"[dtrain] preflight passed: {len(report.rows)} workers placed, stepped, all-reduced and checkpointed")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from dtrain.config import to_dict
    from dtrain.launch.search_space import read_tune_section
    from dtrain.launch.tune import BEST_FILE, JOB_FILE, RESULTS_FILE, print_table, run_search

    if args.resume:
        job = _load_run(args.job, JOB_FILE, args.overrides)
        _refuse_checkpoint_changes(_load_run(args.job, JOB_FILE, []), job, search=True)
    else:
        job = _load(args.job, args.overrides)
    tune_cfg, _ = read_tune_section(to_dict(job).get("tune"))
    _check_buildable(job, args.address, tune_cfg.metric)
    check_trackers(job)
    rows, tune_cfg = run_search(job, address=args.address, resume=args.resume)
    search_dir = join(job.runs_dir if is_uri(job.runs_dir) else Path(job.runs_dir).resolve(), job.name)
    best = join(search_dir, BEST_FILE)
    print_table(rows, tune_cfg.metric)
    print(f"[dtrain] results: {join(search_dir, RESULTS_FILE)}")
    if read_text(RunStore(str(search_dir)) if is_uri(search_dir) else search_dir, BEST_FILE) is not None:
        print(f"[dtrain] best job: {best}  (run it with: dtrain train {best})")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    job = _load(args.job, args.overrides)
    print(OmegaConf.to_yaml(job, resolve=True), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dtrain.report import write_report

    print(f"[dtrain] report: {write_report(args.run_dir, args.out)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from dtrain.data import DATASETS
    from dtrain.models import MODELS, lookup_model
    from dtrain.models.plugins import ENTRY_POINT_GROUP, plugin_entry_points

    for name, (cfg_cls, _model_cls, description) in MODELS.items():
        _print_model(name, cfg_cls, description)
    plugins = plugin_entry_points()
    print(f"plugins (entry point group {ENTRY_POINT_GROUP}): " + ("" if plugins else "none installed"))
    for name, ep in sorted(plugins.items()):
        try:
            cfg_cls, _model_cls, description = lookup_model(name)
        except DtrainError as err:  # a broken plugin is listed with why, and the others still are
            print(f"{name}: {ep.value} (unusable: {err})")
            continue
        _print_model(name, cfg_cls, f"{description} ({ep.value})")
    print("any CatalogModel subclass by import path: model.name=my_pkg.nets:MyModel")
    print("data sets: " + ", ".join(sorted(DATASETS)) + ", parquet and images (streamed; csv and npz "
          "with data.stream=true: docs/streaming.md), or a loader by "
          "import path: data.name=my_pkg.data:load")
    return 0


def _print_model(name: str, cfg_cls: type, description: str) -> None:
    from dtrain.config import fields_doc

    print(f"{name}: {description}")
    for field, typ, default in fields_doc(cfg_cls):
        if field != "name":
            print(f"    {field}: {typ} = {default!r}")


def cmd_submit(args: argparse.Namespace) -> int:
    from dtrain.launch import submit

    # Only the spec is checked here: data paths may exist on the cluster alone, and `dtrain train` checks there.
    job = _load(args.job, args.overrides)
    if args.preflight:  # run on the cluster itself, as a job of its own; the job is handed over only if it passes
        from dtrain.launch.preflight import parse_bytes

        limit = ["--memory-limit", args.memory_limit] if args.memory_limit and parse_bytes(args.memory_limit) else []
        probe = submit.submit(job, args.job, args.overrides, address=args.address, command="preflight", options=limit)
        print(f"[dtrain] preflight {probe} on {submit.cluster_address(args.address)}", file=sys.stderr)
        state = submit.follow(submit.connect(args.address), probe)
        if state != "SUCCEEDED":
            raise DtrainError(f"preflight: the job was not submitted: the preflight on the cluster ended {state} "
                              "(its problems are listed above)")
    job_id = submit.submit(job, args.job, args.overrides, address=args.address, command=args.command)
    print(job_id)
    print(f"[dtrain] submitted {job.name} to {submit.cluster_address(args.address)}; "
          f"follow with: dtrain jobs logs {job_id} --follow", file=sys.stderr)
    if not args.follow:
        return 0
    state = submit.follow(submit.connect(args.address), job_id)
    print(f"[dtrain] job {job_id} {state}", file=sys.stderr)
    return 0 if state == "SUCCEEDED" else 1


def cmd_up(args: argparse.Namespace) -> int:
    from dtrain.launch import local_head

    running = local_head.running_address()
    address = running or local_head.up(args.num_cpus, args.num_gpus)
    print(f"[dtrain] local Ray head {'already running' if running else 'started'} at {address} (127.0.0.1 only, "
          f"token auth); `dtrain train` and `dtrain tune` without --address use it until `dtrain down`")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from dtrain.launch import local_head

    stopped = local_head.down()
    print("[dtrain] local Ray head stopped" if stopped else "[dtrain] no local Ray head was running")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from dtrain.launch import submit

    if args.action != "list" and not args.id:
        raise DtrainError(f"jobs {args.action}: expected a submission id (see `dtrain jobs list`)")
    client = submit.connect(args.address)
    if args.action == "list":
        for info in submit.list_jobs(client):
            print(submit.describe(info))
    elif args.action == "status":
        print(submit.describe(submit.status(client, args.id)))
        nodes = submit.worker_nodes(client, args.id)
        if nodes:
            print(f"training workers: {len(nodes)} on {len(set(nodes))} node(s): {', '.join(sorted(set(nodes)))}")
    elif args.action == "logs" and args.follow:
        state = submit.follow(client, args.id)
        print(f"[dtrain] job {args.id} {state}", file=sys.stderr)
        return 0 if state == "SUCCEEDED" else 1
    elif args.action == "logs":
        print(submit.logs(client, args.id), end="")
    else:
        print(f"{args.id}  {submit.stop(client, args.id)}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """dtrain data convert SRC DEST [overrides] | dtrain data inspect PATH."""
    from dtrain.data import stream_source

    if args.action == "inspect":
        if args.format == "images":
            raise DtrainError("data inspect: --format parquet, csv or npz (an image folder has no columns)")
        files = stream_source.scan(args.src, "PATH", args.format)
        rows = "?" if files.num_rows is None else f"{files.num_rows:,}"  # CSV: not in its metadata
        print(f"{files.location}: {rows} rows in {len(files.paths)} file(s)")
        for field in files.schema:
            print(f"  {field.name}: {field.type}")
        return 0
    if args.dest is None:
        raise DtrainError("data convert: expected SRC DEST (a data set name or job file, and a folder)")
    if args.format == "csv":
        raise DtrainError("data convert: --format parquet, npz or images (CSV files are not written)")
    from dtrain.launch.convert import convert

    written = convert(args.src, Path(args.dest), args.overrides, args.rows_per_file, args.format)
    stream = " data.stream=true" if args.format == "npz" else ""
    print(f"[dtrain] wrote {written}; train on it with data.name={args.format}{stream} data.path={args.dest}"
          + (f" data.test_path={Path(args.dest) / 'test'}" if (Path(args.dest) / "test").is_dir() else ""))
    return 0


def _at_least(low: int):
    """An argparse type: an integer >= low (argparse names the option in its one-line error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return value
    return parse


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors are one line, like every other error: `dtrain: error: <what>; usage:
    <the command's usage>`, exit 2."""

    commands: dict[str, argparse.ArgumentParser]
    """The top-level parser's subcommands' parsers, by name."""

    def error(self, message: str) -> NoReturn:
        usage = " ".join(self.format_usage().split()[1:])  # one line, without argparse's "usage:"
        self.exit(2, f"dtrain: error: {message}; usage: {usage}\n")


def build_parser() -> _Parser:
    parser = _Parser(prog="dtrain", description="Distributed training on Ray with DDP or DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a job (local processes or an embedded Ray, or --address for a cluster)")
    p.add_argument("job", help="job YAML, or a run directory with --resume")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. trainer.num_workers=2")
    p.add_argument("--address", default=None, help="Ray cluster address (default: see --local and --ray)")
    p.add_argument("--resume", action="store_true", help="continue the run in the given run directory")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true",
                       help="run the workers as processes on this machine without Ray (the default on one machine "
                            "when no Ray runs and nothing needs one: no restarts, elastic ranges, streamed data or "
                            "object storage)")
    where.add_argument("--ray", action="store_true",
                       help="run through Ray even on one machine where nothing needs it (an embedded Ray unless "
                            "`dtrain up` keeps one)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tune", help="search hyperparameters/architecture with Ray Tune (the job's tune: section)")
    p.add_argument("job", help="job YAML with a tune section, or a search directory with --resume")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, e.g. tune.num_samples=16")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in runs/<search>")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("preflight", help="place the job's workers, run a few real steps, all-reduce, checkpoint "
                       "and tracker checks; print per-rank memory and step time, projected time and cost")
    p.add_argument("job", help="job YAML")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides, as for train")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--memory-limit", default=None,
                   help="fail if a worker's step peaks above this (e.g. 4GiB): resident memory on CPU, device memory "
                   "allocated on GPU")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser("config", help="print the resolved job config")
    p.add_argument("job")
    p.add_argument("overrides", nargs="*", default=[])
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("report", help="write PNG plots and report.md for a run from its metrics.jsonl")
    p.add_argument("run_dir", help="a run directory, runs/<name>")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("data", help="convert SRC DEST: a data set (name or job file) to Parquet files; inspect PATH: "
                       "schema, rows and files of Parquet data from its metadata")
    p.add_argument("action", choices=["convert", "inspect"])
    p.add_argument("src", help="convert: a data set name (digits) or a job file; inspect: a file, folder, glob or URI")
    p.add_argument("dest", nargs="?", default=None, help="convert: the folder to write")
    p.add_argument("overrides", nargs="*", default=[], help="convert: data.key=value overrides, e.g. data.path=x.npz")
    p.add_argument("--rows-per-file", type=_at_least(1), default=100_000, help="convert: rows per Parquet file")
    p.add_argument("--format", choices=["parquet", "csv", "npz", "images"], default="parquet",
                   help="convert: Parquet files, .npz files (data.name=npz data.stream=true) or PNG images in class "
                        "folders (data.name=images); inspect: the files' format (parquet, csv or npz)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("models", help="list catalog models, their parameters, and data sets")
    p.set_defaults(func=cmd_models)

    address_help = "Ray dashboard URL, e.g. http://HEAD:8265 (default: $RAY_ADDRESS or http://127.0.0.1:8265)"
    p = sub.add_parser("submit", help="submit a job to a Ray cluster through the Ray Jobs API; prints its id")
    p.add_argument("job", help="job YAML")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    p.add_argument("--command", choices=["train", "tune"], default=None,
                   help="what the cluster runs (default: tune if the spec has a tune section, else train)")
    p.add_argument("--preflight", action="store_true",
                   help="run `dtrain preflight` on the cluster first; submit only if it passes")
    p.add_argument("--memory-limit", default=None, help="with --preflight: its --memory-limit")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("up", help="keep a Ray head running on this machine, so runs start in seconds")
    p.add_argument("--num-cpus", type=_at_least(1), default=None, help="CPUs the head offers (default: all)")
    p.add_argument("--num-gpus", type=_at_least(0), default=None, help="GPUs the head offers (default: all it finds)")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", help="stop the Ray head `dtrain up` started")
    p.set_defaults(func=cmd_down)

    p = sub.add_parser("jobs", help="list | status ID | logs ID [--follow] | stop ID for jobs on a Ray cluster")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("id", nargs="?", help="submission id (from `dtrain submit` or `dtrain jobs list`)")
    p.add_argument("--address", default=None, help=address_help)
    p.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    p.set_defaults(func=cmd_jobs)
    parser.commands = sub.choices
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with overrides after an option (`dtrain train runs/x --resume trainer.num_workers=1`)
    counted as overrides too: argparse fills the positional list before the option and leaves the rest over."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:  # named with the command's own usage
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    terminated = _stop_on_sigterm()
    try:
        if getattr(args, "job", None) is not None:  # the job may name the user's own code by import path
            from dtrain.launch.project import add_user_code

            add_user_code(args.job)
        return args.func(args)
    except DtrainError as err:
        print(f"dtrain: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if terminated:
            print("dtrain: terminated (SIGTERM); the run stopped as on Ctrl-C", file=sys.stderr)
            return 143
        print("dtrain: interrupted", file=sys.stderr)
        return 130


def _stop_on_sigterm() -> list[bool]:
    """Make SIGTERM (what a scheduler or `kill` sends) stop a run the way Ctrl-C does: the run is aborted and its
    workers stopped, the last checkpoint kept. Returns a flag list that the handler appends to once it fired."""
    import signal
    import threading

    fired: list[bool] = []
    if threading.current_thread() is not threading.main_thread():
        return fired

    def handler(signum: int, frame: object) -> None:
        fired.append(True)
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, handler)
    return fired


if __name__ == "__main__":
    sys.exit(main())
