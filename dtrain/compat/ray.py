"""Ray's private APIs used by dtrain's launchers, in one place (see dtrain.compat).

Imported by dtrain.launch only (the engine never imports ray).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

# Ray Train V2's environment variables (ray.train.v2._internal.constants); check() verifies the names.
V2_ENABLED_ENV = "RAY_TRAIN_V2_ENABLED"
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
"""Seconds between the Train controller's polls of its workers."""
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"
WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
"""Seconds the Train controller waits for its workers' placement group before that attempt times out."""
"""Ray Train otherwise echoes every worker print twice (log + stdout)."""
COLLECTIVE_TIMEOUT_ENV = "RAY_TRAIN_COLLECTIVE_TIMEOUT_S"
"""Seconds Ray Train's own barriers (each ray.train.report) wait for every worker (Ray's default: for ever)."""
PROCESS_GROUP_SHUTDOWN_TIMEOUT_ENV = "TORCH_PROCESS_GROUP_SHUTDOWN_TIMEOUT_S"
"""Seconds Ray Train waits for the workers to destroy their process group before a restart (ray.train.constants;
Ray's default 30 s, all of it spent when a worker is frozen)."""

TRAIN_CONTEXT_MODULE = "ray.train.v2._internal.execution.context"
"""Logs a line per report/checkpoint, through a logger named after its file, not its module."""
TRAIN_ERROR_LOGGER = "ray.train.v2._internal.util"
"""Where Ray Train logs the training function's exception, with its traceback, on the worker."""


def quiet_train_worker_logs(drop: Callable[[logging.LogRecord], bool]) -> None:
    """In a Ray Train worker: no line per report, and drop() decides which error records are not shown."""
    spec = importlib.util.find_spec(TRAIN_CONTEXT_MODULE)
    for name in ("ray.train", spec.origin if spec else ""):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(TRAIN_ERROR_LOGGER).addFilter(lambda record: not drop(record))


DATASETS_CALLBACK = "ray.train.v2._internal.callbacks.datasets.DatasetsCallback"
"""Ray Train's callback that starts a DatasetManager actor for every run, with Ray datasets or without."""


def torch_trainer(*args: Any, **kwargs: Any) -> Any:
    """ray.train.torch.TorchTrainer(*args, **kwargs); without Ray datasets, minus the DatasetManager actor Ray Train
    would start anyway (a process of its own for the run, a few CPU-seconds while the workers start)."""
    from ray.train.torch import TorchTrainer

    module, _, name = DATASETS_CALLBACK.rpartition(".")
    datasets_callback = getattr(importlib.import_module(module), name)

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()
            return callbacks if self.datasets else [c for c in callbacks if not isinstance(c, datasets_callback)]

    return Trainer(*args, **kwargs)


def preemption_notice() -> Any:
    """In a Ray Train worker: Ray's notice that a node of this worker group is being drained for preemption (a spot
    reclaim, a SIGTERM to a node's `ray start`), or None. Ray Train's PreemptionWatcher hands it to every worker; this
    reads the worker's own copy, without the cross-worker barrier of the public ray.train.get_preemption_info()."""
    return importlib.import_module(TRAIN_CONTEXT_MODULE).get_train_context().preemption_context.preemption_info


UPLOAD_LOGGERS = ("ray._private.runtime_env.packaging", "ray.dashboard.modules.dashboard_sdk")
"""Loggers that log every file of a working_dir that `ray job submit` packs and uploads."""


NOTICE_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
"""Driver-side loggers whose WARNING lines are notices, not problems (token authentication is on: as it should)."""


def quiet_driver_notices() -> None:
    """No notice lines from Ray in the driver when a local Ray starts (only its errors)."""
    for name in NOTICE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


PRINT_LOGS_HANDLER = "ray_print_logs"
"""The driver-side handler (ray._private.worker) that prints every worker's output lines to this console."""


def show_worker_lines(keep: Callable[[str], bool]) -> None:
    """Of the output Ray streams from every worker and actor to the driver's console, print only the lines keep()
    accepts, as they are (without Ray's "(Actor pid=...)" prefix); the rest stays in Ray's log files."""
    import sys

    from ray._private import worker

    def print_kept(data: dict[str, Any]) -> None:
        sink = sys.stderr if data.get("is_err") else sys.stdout
        for line in data.get("lines", []):
            if keep(line):
                print(line, file=sink, flush=True)

    dispatcher = worker.global_worker_stdstream_dispatcher
    dispatcher.remove_handler(PRINT_LOGS_HANDLER)
    dispatcher.add_handler(PRINT_LOGS_HANDLER, print_kept)


def quiet_upload_logs() -> None:
    """No line per uploaded file when submitting a job."""
    for name in UPLOAD_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def abort_train_run(controller: Any, timeout_s: float = 60) -> None:
    """Abort a Ray Train run through its controller actor (TrainController.abort), waiting up to timeout_s."""
    import ray

    try:
        ray.get(controller.abort.remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - abort ends the actor; its exit surfaces as an error here
        pass


def state_api_get(client: Any, path: str) -> Any:
    """GET a path of the dashboard's state API through a JobSubmissionClient (its _do_request keeps the headers)."""
    return client._do_request("GET", path)


LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray replaces a node address of 127.0.0.1 by the host's outward one (services.resolve_ip_for_localhost), so its
GCS, raylet, workers and agents listen on every interface; with multi-node clusters off
(ray_constants.ENABLE_RAY_CLUSTER, read from this variable), the node address stays loopback and they listen there."""


def init_local(**kwargs: Any) -> None:
    """ray.init of a new single-node Ray whose processes listen on 127.0.0.1 only."""
    import ray

    with _loopback_nodes():
        ray.init(**kwargs)


def connect(address: str, *, loopback_only: bool = False, token_auth: bool = False, **kwargs: Any) -> None:
    """ray.init(address=...). loopback_only: the cluster listens on 127.0.0.1 only (init_local's, `ray start` under
    LOOPBACK_ENV=0), where Ray would first turn a loopback address into the host's outward one; token_auth: the
    cluster requires the token, whatever RAY_AUTH_MODE this process started with."""
    import ray

    if token_auth:
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()  # RAY_AUTH_MODE=token, and Ray's cached config refreshed to see it
    with _loopback_nodes() if loopback_only else contextlib.nullcontext():
        ray.init(address=address, **kwargs)


def outward_address(host: str) -> str:
    """The address Ray connects to for host: the host's outward address in place of a loopback one."""
    from ray._private.services import resolve_ip_for_localhost

    return resolve_ip_for_localhost(host)


@contextlib.contextmanager
def _loopback_nodes() -> Iterator[None]:
    """Ray node addresses stay 127.0.0.1 (in this process, and in the processes ray.init starts) while inside."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:  # a later ray.init(address=...) to a real cluster must see its real addresses again
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = saved_env


TUNE_LOGGER = "ray.tune.tune"
TUNE_STOP_MESSAGES = ("Stop signal received", "has been interrupted")
"""What Tune's SIGINT handler logs (ray.tune.tune) when a search is stopped: its advice names Tuner.restore."""


@contextlib.contextmanager
def tune_interruption() -> Iterator[threading.Event]:
    """An event set when a signal stops the Tune search run inside; Tune's own lines about it are not shown."""
    stopped = threading.Event()

    def keep(record: logging.LogRecord) -> bool:
        if any(text in record.getMessage() for text in TUNE_STOP_MESSAGES):
            stopped.set()
            return False
        return True

    logger = logging.getLogger(TUNE_LOGGER)
    logger.addFilter(keep)
    try:
        yield stopped
    finally:
        logger.removeFilter(keep)


STARTUP_TIMEOUT = "The current node timed out during startup"
"""What ray.init raises (as a bare Exception, ray._private.node) when the new node does not register in time."""


def is_startup_timeout(err: BaseException) -> bool:
    """Whether err is ray.init's 'node timed out during startup' (a loaded machine), which is worth a retry."""
    return STARTUP_TIMEOUT in str(err)


def is_worker_start_timeout(err: BaseException) -> bool:
    """Whether err (a Train run's failure) is its workers' placement not coming through in time."""
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from dtrain.errors import find_in_chain

    return find_in_chain(err, lambda e: isinstance(e, WorkerGroupStartupTimeoutError)) is not None


def is_report_timeout(err: BaseException) -> bool:
    """Whether err is Ray Train's barrier in ray.train.report giving up (after COLLECTIVE_TIMEOUT_ENV seconds) on a
    worker that did not arrive."""
    from ray.train.v2._internal.exceptions import CollectiveTimeoutError

    return isinstance(err, CollectiveTimeoutError)


def train_snapshot_file() -> str:
    """The file in a Train run's folder where Ray Train keeps its list of the run's checkpoints."""
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    return CHECKPOINT_MANAGER_SNAPSHOT_FILENAME


def wrap_worker_sigterm(first: Callable[[], bool]) -> None:
    """From a Ray worker process's setup hook (before Ray installs its SIGTERM handler, which exits the process):
    on SIGTERM call first(); Ray's handler runs only when it returns False."""
    from ray._private import utils

    install = utils.set_sigterm_handler

    def wrapped(handler: Callable[[int, Any], None]) -> None:
        def on_sigterm(signum: int, frame: Any) -> None:
            if not first():
                handler(signum, frame)

        install(on_sigterm)

    utils.set_sigterm_handler = wrapped


WORKER_SETUP_HOOK = "worker_process_setup_hook"
"""The runtime_env key of a function every Ray worker process runs at start-up (public; documented by Ray)."""


def check() -> None:
    """CompatError naming each private Ray API above that no longer exists."""
    import inspect

    from ray.dashboard.modules.dashboard_sdk import SubmissionClient
    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.controller.controller import TrainController

    from dtrain.compat import require

    def env(name: str) -> Callable[[], Any]:
        return lambda: name in vars(constants).values() or None

    require({
        V2_ENABLED_ENV: env(V2_ENABLED_ENV),
        HEALTH_CHECK_INTERVAL_ENV: env(HEALTH_CHECK_INTERVAL_ENV),
        PREEMPTION_WATCHER_ENV: env(PREEMPTION_WATCHER_ENV),
        PRINT_PATCH_ENV: env(PRINT_PATCH_ENV),
        WORKER_GROUP_START_TIMEOUT_ENV: env(WORKER_GROUP_START_TIMEOUT_ENV),
        COLLECTIVE_TIMEOUT_ENV: env(COLLECTIVE_TIMEOUT_ENV),
        PROCESS_GROUP_SHUTDOWN_TIMEOUT_ENV: lambda: PROCESS_GROUP_SHUTDOWN_TIMEOUT_ENV in importlib.import_module(
            "ray.train.constants").TRAIN_ENV_VARS or None,
        TRAIN_CONTEXT_MODULE: lambda: importlib.util.find_spec(TRAIN_CONTEXT_MODULE),
        f"{TRAIN_ERROR_LOGGER} logging 'Error in training function'": lambda: (
            "Error in training function" in inspect.getsource(importlib.import_module(TRAIN_ERROR_LOGGER)) or None),
        f"{TRAIN_CONTEXT_MODULE}.get_train_context().preemption_context.preemption_info": lambda: (
            "preemption_info" in inspect.signature(importlib.import_module(
                "ray.train.v2._internal.execution.preemption").PreemptionContext).parameters
            and importlib.import_module(TRAIN_CONTEXT_MODULE).get_train_context),
        f"{DATASETS_CALLBACK}, DataParallelTrainer._create_default_callbacks": lambda: (
            importlib.import_module(DATASETS_CALLBACK.rpartition(".")[0])
            and importlib.import_module("ray.train.v2.api.data_parallel_trainer").DataParallelTrainer
            ._create_default_callbacks),
        "TrainController.abort": lambda: TrainController.abort,
        "ray.train.v2._internal.exceptions.CollectiveTimeoutError": lambda: importlib.import_module(
            "ray.train.v2._internal.exceptions").CollectiveTimeoutError,
        "ray._private.worker.global_worker_stdstream_dispatcher": lambda: importlib.import_module(
            "ray._private.worker").global_worker_stdstream_dispatcher,
        f"print handler '{PRINT_LOGS_HANDLER}'": lambda: f'"{PRINT_LOGS_HANDLER}"' in inspect.getsource(
            importlib.import_module("ray._private.worker")) or None,
        **{f"logger module {name}": (lambda n=name: importlib.util.find_spec(n))
           for name in UPLOAD_LOGGERS + NOTICE_LOGGERS},
        "SubmissionClient._do_request": lambda: SubmissionClient._do_request,
        "ray._private.utils.set_sigterm_handler, used by Worker.main_loop": lambda: (
            "set_sigterm_handler(" in inspect.getsource(importlib.import_module("ray._private.worker").Worker.main_loop)
            and importlib.import_module("ray._private.utils").set_sigterm_handler),
        "ray._private.ray_constants.ENABLE_RAY_CLUSTER": lambda: LOOPBACK_ENV in inspect.getsource(
            importlib.import_module("ray._private.ray_constants")) or None,
        **{f"'{text}' ({TUNE_LOGGER})": (lambda t=text: t in inspect.getsource(importlib.import_module(TUNE_LOGGER))
                                          or None) for text in TUNE_STOP_MESSAGES},
        "ray._private.authentication.authentication_token_setup._enable_token_auth": lambda: importlib.import_module(
            "ray._private.authentication.authentication_token_setup")._enable_token_auth,
        "ray._private.services.resolve_ip_for_localhost": lambda: importlib.import_module(
            "ray._private.services").resolve_ip_for_localhost,
        "ray._private.services.get_node_ip_address() honouring ENABLE_RAY_CLUSTER": lambda: (
            "ENABLE_RAY_CLUSTER" in inspect.getsource(importlib.import_module("ray._private.services")) or None),
        f"'{STARTUP_TIMEOUT}' (ray._private.node)": lambda: STARTUP_TIMEOUT in inspect.getsource(
            importlib.import_module("ray._private.node")) or None,
        "ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME": train_snapshot_file,
    })
