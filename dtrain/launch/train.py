"""`dtrain train`: run a job as a Ray Train TorchTrainer (embedded local Ray, or an existing cluster)."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dtrain.compat import ray as ray_compat
from dtrain.config import to_dict, worker_bounds
from dtrain.data.base import DataBundle
from dtrain.data.sharding import check_global_batch
from dtrain.data.stream_source import StreamSource
from dtrain.errors import ConfigError, DtrainError, find_in_chain, first_line
from dtrain.launch import cost, local_head, net
from dtrain.launch.progress import ProgressFollower
from dtrain.launch.project import shipped_paths
from dtrain.launch.sigterm import stop_on_preemption_notice
from dtrain.storage import RunStore, is_uri, join, probe, staging_dir
from dtrain.tracking import CONFIG_FILE, METRICS_FILE


def report(metrics: dict[str, Any], folder: Path | None) -> None:
    """ray.train.report from a worker: metrics, and the checkpoint folder if any, uploaded before it returns (Ray
    removes the folder then). A report is a barrier of all workers: when one does not arrive within Ray's collective
    timeout, this raises TimeoutError, which the training loop reports as a hang."""
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    try:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(str(folder)) if folder else None,
                         checkpoint_upload_mode=CheckpointUploadMode.SYNC, delete_local_checkpoint_after_upload=True)
    except Exception as err:
        if ray_compat.is_report_timeout(err):
            raise TimeoutError(f"ray.train.report: {getattr(err, 'cause', err)}") from err  # the cause: its message
        raise


REPORT_ID = "dtrain/report_id"
"""The key of rank 0's reports under a consumer that acknowledges them (TakenReports); the consumer removes it."""


class TakenReports:
    """Rank 0's reports to a consumer that puts each report's REPORT_ID on acks once it has taken it (dtrain tune's
    trial: once Tune acted on the result). Each report first waits until the consumer took every earlier one. Ray's
    reports otherwise run ahead of the consumer (through the controller's poll, then the trial), so a trial Tune
    stops could train on to its last epoch before the decision arrived, and a checkpoint Tune had yet to copy could
    be deleted by Ray's keep-count. Waiting, a stopped trial trains on only until its next report is due (the next
    epoch's end, or the step its checkpoint is done writing in the background); the wait overlaps the next epoch's
    training, so it shows only when Tune takes longer than an epoch to act on a result. The ids carry a token per
    worker group: a group Ray restarted ignores the acknowledgements of the one before."""

    def __init__(self, acks: Any) -> None:
        import uuid

        self.acks, self.token, self.sent, self.taken = acks, uuid.uuid4().hex, 0, 0

    def tag(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """metrics with the next report's id, once every earlier report was taken."""
        while self.taken < self.sent:
            token, _, seq = self.acks.get().partition(":")
            if token == self.token:
                self.taken = int(seq) + 1
        self.sent += 1
        return {**metrics, REPORT_ID: f"{self.token}:{self.sent - 1}"}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: report through ray.train, resume from ray.train.get_checkpoint()."""
    import ray.train

    from dtrain.launch.project import use_paths

    use_paths(config.get("sys_path", ()))  # the user's code (models by import path), as the driver found it
    with stop_on_preemption_notice(ray.train.get_context().get_world_rank()):
        _train(config)


def _train(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from dtrain.engine.saving import staging_prefix
    from dtrain.launch.worker import run_worker

    acks = config.get("report_acks") if ray.train.get_context().get_world_rank() == 0 else None
    taken = TakenReports(acks) if acks is not None else None

    def publish(metrics: dict[str, Any], folder: Path | None) -> None:
        # Metrics alone go to Ray only when a controller callback consumes them (dtrain tune, whose schedulers act on
        # each report before the trial trains on): dtrain train logs them itself, and each ray.train.report is a
        # round trip through Ray's actors. Without them, each checkpoint is reported, and uploaded, by the
        # checkpoint writer's thread: the report's barrier waits there for the other workers' writes.
        if folder is not None or config.get("report_metrics"):
            report(taken.tag(metrics) if taken is not None else metrics, folder)

    ray_compat.quiet_train_worker_logs(drop=_is_user_error_traceback)
    # loaded once, by the driver; read in place from Ray's shared object store
    data = from_object_store(ray.get(config["data"])) if config.get("data") is not None else None
    if config.get("stream") is not None:  # data.name=parquet: this worker's shares of Ray Data's streams
        from dtrain.launch.stream import worker_stream

        data = worker_stream(config["stream"], config["job"]["data"]["shuffle_buffer"])
    # A run's own latest checkpoint wins; init_checkpoint only seeds a fresh run (dtrain tune's PBT exploit).
    own = ray.train.get_checkpoint()
    if config.get("store") is not None:
        _train_with_store(config, publish, data)
        return
    with tempfile.TemporaryDirectory(prefix=staging_prefix()) as tmp:  # for a checkpoint in remote storage
        resume_dir, retarget = _resume_dir(own or _initial_checkpoint(config), Path(config["run_dir"]),
                                           config.get("resume", False), seeded=own is None, tmp=Path(tmp))
        run_worker(config["job"], config["run_dir"], publish, ray.train.torch.get_device(), resume_dir, data,
                   retarget=retarget, callbacks=config.get("callbacks") or [],
                   publish_in_writer=not config.get("report_metrics"))


def _train_with_store(config: dict[str, Any], publish: Any, data: DataBundle | None) -> None:
    """A worker of a run whose folder is in object storage: it starts from the newest intact checkpoint in the store
    (each candidate downloaded and verified, newest first), if there is one: a fresh run's store has none, a
    restarted or resumed one has its own (Ray's latest registered checkpoint can lag behind the uploads, or be
    missing); else from init_checkpoint (a URI: dtrain tune's PBT hands a trial another trial's checkpoint). rank 0's
    files are staged in a local folder and copied to the store (storage.Mirror)."""
    import ray.train
    import ray.train.torch

    from dtrain.engine.checkpoint import CheckpointError, pick_checkpoint
    from dtrain.engine.saving import staging_prefix
    from dtrain.launch.worker import run_worker

    store, rank = config["store"], ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix=staging_prefix()) as tmp:
        names = reversed(store.folders("checkpoint_"))  # Ray names them by time: newest last
        try:
            resume_dir = pick_checkpoint((store.download(n, Path(tmp) / n) for n in names), warn=rank == 0)
        except CheckpointError:
            if config.get("resume"):
                raise
            resume_dir = None  # restarted before any checkpoint was complete: from the start again
        retarget = resume_dir is None and bool(config.get("init_checkpoint"))  # a fresh run seeded (PBT's exploit)
        if retarget:
            resume_dir = RunStore(config["init_checkpoint"]).download("", Path(tmp) / "init")
        run_dir = staging_dir(store) if rank == 0 else Path(tmp) / "run"
        try:
            run_worker(config["job"], run_dir, publish, ray.train.torch.get_device(), resume_dir, data,
                       retarget=retarget, callbacks=config.get("callbacks") or [],
                       store=store if rank == 0 else None, publish_in_writer=not config.get("report_metrics"))
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)


def to_object_store(data: DataBundle) -> dict[str, Any]:
    """The data as numpy arrays, which Ray's object store hands to every worker on the node without a copy (torch
    tensors would be pickled, and each worker would unpickle a copy of its own)."""
    return {"splits": [tuple(t.numpy() for t in split) for split in (data.train, data.val, data.test)],
            "meta": data.meta}


def from_object_store(shipped: dict[str, Any]) -> DataBundle:
    """DataBundle of tensors over the object store's (read-only, shared) arrays: the loop only reads them."""
    import torch

    with warnings.catch_warnings():  # torch warns that the arrays are read-only: nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        splits = [tuple(torch.from_numpy(a) for a in split) for split in shipped["splits"]]
    return DataBundle(*splits, shipped["meta"])


def _is_user_error_traceback(record: logging.LogRecord) -> bool:
    """Ray Train's "Error in training function" record when the error is dtrain's (a DtrainError: the user's
    mistake, which the driver prints as one line); Ray would stream the worker's traceback to the user's console."""
    lines = record.getMessage().rstrip().splitlines()
    return bool(lines) and lines[0].startswith("Error in training function") and lines[-1].startswith("dtrain.errors.")


def _initial_checkpoint(config: dict[str, Any]) -> Any:
    from ray.train import Checkpoint

    return Checkpoint(config["init_checkpoint"]) if config.get("init_checkpoint") else None


def _resume_dir(checkpoint: Any, run_dir: Path, resume: bool, seeded: bool, tmp: Path) -> tuple[Path | None, bool]:
    """(The checkpoint a worker starts from, whether it seeds this run from another run's): the run dir's newest
    intact checkpoint; else `checkpoint`, which is init_checkpoint when `seeded` (Ray has none of this run's), whose
    optimizer then takes this run's settings (retargeted); else None. A checkpoint in remote storage is downloaded
    into tmp; a local one is read in place (the loop only reads it).

    The run dir is scanned rather than trusting Ray's latest checkpoint: Ray hands out only what its controller
    registered, which needs every rank's report (a node that dies after writing its files but before reporting
    leaves an intact checkpoint Ray never registered) and a snapshot file written before the run stopped (a Ctrl-C
    can come first). A fresh run's dir has no checkpoints (claim_run_dir creates it), so whatever is there is this
    run's own. Ray names the folders by time, each one's manifest says if it is complete, and a corrupt newest one
    falls back to the previous one.
    """
    import ray.train

    from dtrain.engine.checkpoint import CheckpointError, pick_checkpoint, run_checkpoints

    warn = ray.train.get_context().get_world_rank() == 0
    try:
        own = pick_checkpoint(run_checkpoints(run_dir), warn=warn)
    except CheckpointError:  # restarted before any checkpoint was complete: from the start (or the init) again
        if resume:
            raise
        own = None
    if own is not None or checkpoint is None:
        return own, False
    local = checkpoint.filesystem.type_name == "local"
    folder = Path(checkpoint.path) if local else Path(checkpoint.to_directory(str(tmp / "checkpoint")))
    return pick_checkpoint([folder], warn=warn), seeded


def init_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to a cluster at address, or start an embedded single-node Ray bound to 127.0.0.1."""

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault(ray_compat.V2_ENABLED_ENV, "1")
    # Make this package importable by the workers Ray starts (they may run from another working directory), and
    # keep Ray Train from echoing every worker print twice.
    # A restart after a frozen worker need not wait Ray's 30 s for it to destroy its process group (the controller
    # reads this variable, and Ray Train does not pass it on from the driver).
    runtime_env = {"env_vars": {"PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", ""),
                                ray_compat.PRINT_PATCH_ENV: "0",
                                ray_compat.PROCESS_GROUP_SHUTDOWN_TIMEOUT_ENV: str(SHUTDOWN_TIMEOUT_S)},
                   # a SIGTERM to a training worker: checkpoint at the next step boundary, then hand over
                   ray_compat.WORKER_SETUP_HOOK: "dtrain.launch.sigterm.graceful_sigterm"}
    ray_compat.quiet_driver_notices()
    with _keep_sigterm_handler():
        _start_ray(address, num_cpus, runtime_env)
    # dtrain's own lines only: Ray's and libraries' chatter from workers and actors stays in Ray's log files
    ray_compat.show_worker_lines(lambda line: line.startswith("[dtrain]"))


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """Ray's core installs its own SIGTERM handler in the driver (it prints a raw stack dump); keep the caller's."""
    import signal

    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(handler) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)


def _start_ray(address: str | None, num_cpus: int | None, runtime_env: dict[str, Any]) -> None:
    import ray

    head = address is None and local_head.running_address()
    if head:
        print(f"[dtrain] using the local Ray head at {head} (`dtrain up`; `dtrain down` stops it)", flush=True)
    if address or head:
        target = address or head
        # a token in the environment is sent whatever RAY_AUTH_MODE says (without it Ray retries for 20 s, then fails)
        token = bool(head) or any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
        parts = net.host_port(target)
        if parts is not None and not net.answers(*parts):  # Ray itself would retry for minutes
            raise DtrainError(f"--address {target}: nothing answers there; start the cluster (`make cluster-up`, "
                              "`ray start --head`) or check the address")
        try:
            ray_compat.connect(target, loopback_only=net.loopback_only(target), token_auth=token,
                               logging_level=logging.WARNING, runtime_env=runtime_env)
        except ConnectionError as err:
            raise DtrainError(f"--address {target}: no Ray cluster accepted the connection ({first_line(err)}); "
                              "check the address, and for a cluster with token authentication set "
                              "RAY_AUTH_TOKEN") from None
        return
    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            # The dashboard is kept: Ray Train's placement-group cleaner polls its state API and warns without it.
            ray_compat.init_local(num_cpus=num_cpus or os.cpu_count(), dashboard_host="127.0.0.1",
                                  logging_level=logging.WARNING, runtime_env=runtime_env)
            return
        except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception when its node does not come up
            ray.shutdown()  # stop what did start before trying again
            if not ray_compat.is_startup_timeout(err):
                raise
            if attempt == START_ATTEMPTS:
                raise DtrainError(f"Ray could not start on this machine: its node did not come up within Ray's 30 s, "
                                  f"{START_ATTEMPTS} times; the machine is probably overloaded (other runs?): try "
                                  "again when it is quieter, or start Ray once with `ray start --head` and pass "
                                  "--address") from None
            print(f"[dtrain] Ray's node did not come up in time (attempt {attempt} of {START_ATTEMPTS}); "
                  "starting it again", file=sys.stderr, flush=True)


START_ATTEMPTS = 3
"""Embedded Ray start-ups tried before giving up: on a loaded machine Ray's node can miss its fixed 30 s."""


def resolve_resources(job: DictConfig) -> tuple[int, bool]:
    """(num_workers, use_gpu) from the job and what the connected cluster has; error if they cannot fit."""
    import ray

    resources = ray.cluster_resources()
    return fit_workers(job, int(resources.get("GPU", 0)), resources.get("CPU", 0), "the cluster")


def fit_workers(job: DictConfig, gpus: int, cpus: float, where: str) -> tuple[int, bool]:
    """(num_workers, use_gpu) of the job on `where` ("the cluster", "this machine") with gpus and cpus; else a
    ConfigError naming the setting."""
    t = job.trainer
    use_gpu = {"auto": gpus > 0, "true": True, "false": False}[str(t.use_gpu).lower()]
    if use_gpu and gpus == 0:
        raise ConfigError(f"trainer.use_gpu: true, but {where} has no GPUs")
    workers = fewest_workers(job, gpus if use_gpu else 2)
    check_workers_split_batch(job, workers)
    if use_gpu and workers > gpus:
        raise ConfigError(f"trainer.num_workers: {workers} workers need {workers} GPUs, {where} has {gpus}")
    if workers * t.cpus_per_worker > cpus:
        raise ConfigError(f"trainer.num_workers: {workers} workers x {t.cpus_per_worker} CPUs need "
                          f"{workers * t.cpus_per_worker:g} CPUs, {where} has {cpus:g}")
    return workers, use_gpu


def check_local_resources(job: DictConfig) -> None:
    """Fail fast if the job cannot fit on this machine, when Ray is about to be started here (no --address)."""
    import ray

    if ray.is_initialized():
        return  # connected already: resolve_resources checks against what that Ray has
    import torch

    t, cpus = job.trainer, os.cpu_count() or 1
    use_gpu = str(t.use_gpu).lower()
    if use_gpu == "true" and not torch.cuda.is_available():
        raise ConfigError("trainer.use_gpu: true, but this machine has no GPU (use --address for a GPU cluster)")
    workers = local_workers(job)
    check_workers_split_batch(job, workers)
    if workers * t.cpus_per_worker > cpus:
        raise ConfigError(f"trainer.num_workers: {workers} workers x {t.cpus_per_worker:g} CPUs need "
                          f"{workers * t.cpus_per_worker:g} CPUs, this machine has {cpus}")


def check_workers_split_batch(job: DictConfig, workers: int) -> None:
    """ConfigError when data.global_batch_size is set and the worker count (or elastic range) cannot split it."""
    if job.data.global_batch_size is not None:
        low, high = worker_bounds(job.trainer.num_workers) or (workers, workers)
        check_global_batch(job.data.global_batch_size, range(low, high + 1))


def fewest_workers(job: DictConfig, default: int) -> int:
    """The workers the run needs to start: trainer.num_workers, the min of an elastic range, else default."""
    return (worker_bounds(job.trainer.num_workers) or (default,))[0]


def local_workers(job: DictConfig) -> int:
    """How many workers the job starts on this machine (trainer.num_workers or an elastic range's min, else one
    per GPU, else 2)."""
    import torch

    gpus = torch.cuda.device_count() if str(job.trainer.use_gpu).lower() != "false" else 0
    return fewest_workers(job, gpus or 2)


def check_model_fits(num_params: int, job: DictConfig) -> None:
    """ConfigError before anything is allocated when the workers on this machine cannot hold the model's weights,
    gradients and optimizer state (a lower bound: activations and data come on top). num_params: counted on a
    model built on the meta device, which allocates nothing."""
    import psutil

    workers, t = local_workers(job), job.trainer
    per_param = {"weights": 4, "gradients": 4, "optimizer state": _optimizer_bytes(job.optim)}
    if t.strategy == "deepspeed":  # ZeRO divides state among the workers: optimizer from 1, gradients 2, weights 3
        stage = t.deepspeed.zero_stage
        for part, from_stage in (("optimizer state", 1), ("gradients", 2), ("weights", 3)):
            per_param[part] /= workers if stage >= from_stage else 1
    need = num_params * sum(per_param.values())
    if str(t.use_gpu).lower() != "false" and _gpu_bytes() is not None:
        have, where = _gpu_bytes(), "each GPU has"
        total = need
    else:
        have, where, total = psutil.virtual_memory().available, "this machine has", need * workers
    if total > have:
        raise ConfigError(f"model: {job.model.name} has {num_params:,} parameters; their weights, gradients and "
                          f"optimizer state need ~{need / 2**30:.1f} GiB per worker x {workers} workers = "
                          f"{total / 2**30:.1f} GiB, {where} {have / 2**30:.1f} GiB available; make the model "
                          "smaller, shard it (trainer.strategy=deepspeed, zero_stage 3) or use a bigger machine")


def _optimizer_bytes(optim: Any) -> int:
    if optim.name in ("adam", "adamw"):
        return 8  # two fp32 moments
    return 4 if optim.momentum else 0


def _gpu_bytes() -> int | None:
    import torch

    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


def run_dir_for(job: DictConfig) -> Path | str:
    """The run's folder: a local path, or a URI in object storage (dtrain.storage)."""
    if is_uri(job.runs_dir):
        return join(job.runs_dir, job.name)
    return Path(job.runs_dir).expanduser().resolve() / job.name


def fit_job(job: DictConfig, *, address: str | None = None, resume: bool = False, callbacks: list | None = None,
            init_checkpoint: str | None = None, data: Any = None, worker_callbacks: list | None = None,
            stream_tasks: dict[str, Any] | None = None, report_acks: Any = None) -> dict[str, Any]:
    """Run job through Ray Train; returns summary.json's content. Claims runs/<name>/ (config.yaml) first.

    callbacks: Ray Train callbacks (run in its controller); worker_callbacks: engine callbacks (in every worker).
    report_acks: a ray.util.queue.Queue on which the consumer of the reports acknowledges each (TakenReports).
    init_checkpoint: a checkpoint folder to start from when the run has none of its own (weights, optimizer, state);
    the run keeps its weights and optimizer state and applies its own optimizer settings.
    data: the job's DataBundle if the caller loaded it already: it goes to the workers through Ray's object store
    (one load for the whole run, and workers never need the data files or their readers); else each worker loads it.
    A StreamSource (data.name=parquet, ...) is streamed instead: Ray Data reads the files, each worker gets a share;
    stream_tasks: what each Ray Data task asks for (default: launch.stream.task_resources of what this run's workers
    leave free; dtrain tune passes what its concurrent trials leave).
    """
    if address is None:
        check_local_resources(job)  # before an embedded Ray starts (slow) and before the run dir is claimed
    run_dir = claim_run_dir(job, resume)
    if resume and isinstance(run_dir, RunStore):
        # Its workers pick the newest intact checkpoint in the store themselves (_train_with_store). Ray Train's own
        # list of the earlier segment's checkpoints can name one that is gone from the bucket, and then its
        # controller refuses to start: the list is dropped and Ray's keep-count starts again from this segment.
        run_dir.remove(ray_compat.train_snapshot_file())
    try:
        init_ray(address)
        workers, use_gpu = resolve_resources(job)
        trainer = _trainer(job, run_dir, workers, use_gpu, resume=resume, callbacks=callbacks,
                           init_checkpoint=init_checkpoint, data=data, worker_callbacks=worker_callbacks,
                           stream_tasks=stream_tasks, report_acks=report_acks)
        with cost.Segment(run_dir, worker_group(job, workers, use_gpu)):
            _fit(trainer, job, run_dir, workers, local=address is None)
        if resume and isinstance(run_dir, RunStore) and job.checkpoint.keep:
            _drop_older_checkpoints(run_dir, job.checkpoint.keep)
    except BaseException:
        if not resume:
            release_unused(run_dir)  # a run that never trained leaves no folder behind to block its name
        raise
    return cost.add_to_summary(run_dir, cost.run_cost(run_dir, to_dict(job.cost)))


def worker_group(job: DictConfig, workers: int, use_gpu: bool) -> cost.WorkerGroup:
    """The resources the job's worker group holds (what its ScalingConfig asks Ray for)."""
    return cost.WorkerGroup(workers, job.trainer.cpus_per_worker, 1.0 if use_gpu else 0.0)


def claim_run_dir(job: DictConfig, resume: bool) -> Path | RunStore:
    """The run directory, taken before anything starts: created at once (of two runs started together with the
    same name, one gets it; the other is told) with config.yaml in it, or with resume, found with its config.yaml.
    In object storage (a URI) after a probe write: there the claim is config.yaml's existence, checked then written
    (object stores have no atomic folder creation, so two runs started at the same instant could both pass)."""
    if is_uri(job.runs_dir):
        store = probe(job.runs_dir).child(job.name)
        if resume != store.exists(CONFIG_FILE):
            raise ConfigError(f"{store}: not a run directory (no {CONFIG_FILE}); --resume takes runs/<name>"
                              if resume else f"name: run directory {store} already exists; pass --resume to "
                              "continue it or choose another name=")
        if not resume:
            store.write_bytes(CONFIG_FILE, OmegaConf.to_yaml(job).encode())
        return store
    runs = usable_folder(Path(job.runs_dir).expanduser(), "runs_dir")
    run_dir = runs / job.name
    if resume:
        if not (run_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG_FILE}); --resume takes runs/<name>")
        return run_dir
    try:
        run_dir.mkdir()
    except FileExistsError:
        raise ConfigError(f"name: run directory {run_dir} already exists; pass --resume to continue it or choose "
                          "another name=") from None
    OmegaConf.save(job, run_dir / CONFIG_FILE)
    return run_dir


def _drop_older_checkpoints(store: RunStore, keep: int) -> None:
    """After a resumed run in a bucket ended: Ray's keep-count covered only this segment's checkpoints (its list of
    the earlier ones was dropped), so the folders older than the newest `keep` go now. They are older than every
    checkpoint this segment finished uploading, broken ones (cut-off uploads) included."""
    for name in store.folders("checkpoint_")[:-keep]:  # Ray names them by time: oldest first
        store.child(name).delete()


def usable_folder(path: Path, key: str) -> Path:
    """path as an absolute folder that exists (created if need be) and can be written; ConfigError naming key."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ConfigError(f"{key}: {path} is a file or lies under one; expected a folder") from None
    except OSError as err:
        raise ConfigError(f"{key}: {path} cannot be created ({err.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: {path} is not writable")
    return path.resolve()


def release_unused(run_dir: Path | RunStore, trained: str = METRICS_FILE) -> None:
    """Remove a claimed run (or search) directory that never trained (no `trained` file in it: rank 0's
    metrics.jsonl, a search's trials/), so that its name is free again; Ray's own bookkeeping goes with it."""
    if isinstance(run_dir, RunStore):
        if not run_dir.exists(trained):
            run_dir.delete()
    elif run_dir.is_dir() and not (run_dir / trained).exists():
        shutil.rmtree(run_dir, ignore_errors=True)


def _trainer(job: DictConfig, run_dir: Path | RunStore, workers: int, use_gpu: bool, *, resume: bool,
             callbacks: list | None, init_checkpoint: str | None, data: Any, worker_callbacks: list | None,
             stream_tasks: dict[str, Any] | None = None, report_acks: Any = None) -> Any:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchConfig

    store = run_dir if isinstance(run_dir, RunStore) else None
    streams, stream_info, shipped = {}, None, None
    if isinstance(data, StreamSource):  # streamed by Ray Data: the driver never holds the rows
        from dtrain.launch.stream import data_config, prepare, task_resources

        if stream_tasks is None:
            cluster_cpus = ray.cluster_resources().get("CPU", 0)
            stream_tasks = task_resources(cluster_cpus - workers * job.trainer.cpus_per_worker, cluster_cpus)
        datasets, stream_info = prepare(data, job.data.standardize, stream_tasks)
        streams = {"datasets": datasets, "dataset_config": data_config()}
    elif data is not None:
        shipped = ray.put(to_object_store(data))
    if store is not None:  # Ray Train writes the checkpoints into the store itself, through its filesystem
        storage = {"storage_path": posixpath.dirname(store.path), "storage_filesystem": store.fs}
    else:
        storage = {"storage_path": str(run_dir.parent)}
    return ray_compat.torch_trainer(
        train_loop_per_worker,
        train_loop_config={"job": to_dict(job), "run_dir": str(run_dir), "store": store,
                           "init_checkpoint": init_checkpoint,
                           "resume": resume, "data": shipped, "stream": stream_info,
                           "report_metrics": bool(callbacks), "report_acks": report_acks,
                           "callbacks": worker_callbacks or [],
                           "sys_path": shipped_paths()},
        scaling_config=scaling_config(job, workers, use_gpu),
        # the process group's timeout (gloo, NCCL): a collective a peer never joins fails instead of waiting
        torch_config=TorchConfig(timeout_s=math.ceil(job.trainer.collective_timeout_s)),
        run_config=RunConfig(name=job.name, **storage,
                             # controller failures are the workers' placement timing out: fail at the first one,
                             # unless elastic: after a node died Ray tries the old size until it knows the node is
                             # gone, and the next try places the workers that fit
                             failure_config=FailureConfig(max_failures=job.trainer.max_failures,
                                                          controller_failure_limit=job.trainer.max_failures
                                                          if _elastic_range(job) else 0),
                             checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep),
                             callbacks=callbacks, logging_config=LoggingConfig(log_level="WARNING")),
        **streams,
    )


def _elastic_range(job: DictConfig) -> tuple[int, int] | None:
    """(min, max) of an elastic trainer.num_workers; None for a fixed count."""
    bounds = worker_bounds(job.trainer.num_workers)
    return bounds if bounds is not None and bounds[0] != bounds[1] else None


def scaling_config(job: DictConfig, workers: int, use_gpu: bool, elastic: bool = True) -> Any:
    """The workers Ray Train places for the job: `workers`, or with elastic and a [min, max] trainer.num_workers,
    Ray Train's elastic range (it starts once min fit and resizes within the range, restarting the group)."""
    from ray.train import ScalingConfig

    placed = {"use_gpu": use_gpu, "resources_per_worker": {"CPU": job.trainer.cpus_per_worker}}
    if elastic and (bounds := _elastic_range(job)):
        return ScalingConfig(num_workers=tuple(bounds), elastic_resize_monitor_interval_s=job.trainer.resize_check_s,
                             **placed)
    return ScalingConfig(num_workers=workers, **placed)


def _fit(trainer: Any, job: DictConfig, run_dir: Path | RunStore, workers: int, local: bool) -> None:
    """trainer.fit() with the progress bar following the run, and a user error from a worker raised as itself."""
    follower = ProgressFollower(run_dir) if job.logging.progress else None
    if follower:
        follower.start()
    try:
        controller = {POLL_ENV: os.environ.get(POLL_ENV) or poll_interval(workers),
                      ray_compat.WORKER_GROUP_START_TIMEOUT_ENV: f"{job.trainer.start_timeout_s:g}",
                      # Ray Train's own barriers (ray.train.report) give up after the same time as torch's
                      ray_compat.COLLECTIVE_TIMEOUT_ENV: f"{job.trainer.collective_timeout_s:g}"}
        if local:  # Ray on this machine alone: no node can be preempted, and the watcher logs an error
            controller[PREEMPTION_ENV] = os.environ.get(PREEMPTION_ENV) or "0"
        with _controller_env(controller):
            trainer.fit()
    except SystemExit:  # Ray Train's Ctrl-C handler aborted the run (workers stopped) and exits: say so
        raise KeyboardInterrupt from None
    except Exception as err:  # Ray wraps worker exceptions; surface a user error as itself
        user = find_user_error(err)
        if user is not None:
            raise user from None
        if ray_compat.is_worker_start_timeout(err):
            t = job.trainer
            raise DtrainError(f"trainer.start_timeout_s: the {workers} workers ({t.cpus_per_worker:g} CPUs each) "
                              f"could not be placed within {t.start_timeout_s:g} s: other runs, search trials or "
                              "actors hold the cluster's resources; wait for them, lower trainer.num_workers, or "
                              "raise trainer.start_timeout_s") from None
        raise
    finally:
        if follower:
            follower.stop()


POLL_ENV = ray_compat.HEALTH_CHECK_INTERVAL_ENV
SHUTDOWN_TIMEOUT_S = 5
"""Seconds a restart waits for the old workers to destroy their process group (a local teardown when healthy)."""
PREEMPTION_ENV = ray_compat.PREEMPTION_WATCHER_ENV


def poll_interval(workers: int) -> str:
    """Seconds between the Ray Train controller's polls of the workers (Ray's default: 2 s).

    A worker's ray.train.report (each checkpoint, and each epoch's metrics under dtrain tune) waits for the
    controller's next poll, so the interval is a cost at every such epoch end (Ray's default made short epochs
    wait most of a poll interval each). Each poll is one call
    per worker: 0.05 s up to 8 workers, then longer, keeping the controller at about 160 calls a second.
    """
    return f"{min(2.0, 0.05 * math.ceil(workers / 8)):g}"


@contextlib.contextmanager
def _controller_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the Train controller that TorchTrainer.fit starts (Ray Train copies the
    driver's values of its own variables to it), restoring the driver's environment afterwards."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def find_user_error(err: BaseException) -> DtrainError | None:
    """The DtrainError behind a Ray error (worker failures, task errors, causes), if there is one."""
    return find_in_chain(err, lambda e: isinstance(e, DtrainError))


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])
