"""The job spec: one dataclass per section, merged by omegaconf from YAML and ``key=value`` overrides.

Each component owns the dataclass of its section (data: DataConfig, optim: OptimConfig, a strategy its
trainer.<name> options, a model its model section, chosen by model.name); this module assembles them into the job
schema, so a typo anywhere is caught the same way.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from dtrain.data.config import DataConfig
from dtrain.data.sharding import check_global_batch
from dtrain.data.stream_source import streams
from dtrain.engine.loop import EarlyStoppingConfig
from dtrain.engine.optim import OptimConfig
from dtrain.engine.precision import DTYPES
from dtrain.engine.prepare import checkpoint_layers, compile_options
from dtrain.engine.profile import ProfileConfig
from dtrain.engine.strategies import STRATEGIES, strategy_class, strategy_options
from dtrain.errors import ConfigError, check

PRECISIONS = tuple(DTYPES)


@dataclass
class TrainerBase:
    strategy: str = "ddp"
    """A registered strategy: ddp, deepspeed or fsdp (see dtrain.engine.strategies)."""
    num_workers: Any = None
    """Training workers: a number; [min, max] for an elastic run (Ray Train starts it once min workers fit, grows
    and shrinks it within the range, each time from the newest checkpoint; needs data.global_batch_size, see
    docs/elastic.md); null = one per GPU when GPUs are present, otherwise 2."""
    use_gpu: str = "auto"
    """auto, true or false."""
    cpus_per_worker: float = 1
    """CPUs reserved by each worker."""
    precision: str = "32"
    """32, bf16-mixed or fp16-mixed."""
    max_epochs: int = 10
    """Epochs to train (per stage for staged models)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides max_epochs when reached first)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    grad_clip: float | None = None
    """Clip threshold; null disables clipping."""
    grad_clip_mode: str = "norm"
    """norm (total L2 norm) or value (element-wise)."""
    log_every_n_steps: int = 10
    """Step metrics are logged every N optimizer steps."""
    seed: int = 0
    """Seed of model initialisation, shuffling and dropout."""
    max_nonfinite_steps: int = 5
    """Stop after this many consecutive skipped steps: non-finite gradients (under fp16, where the loss scaler
    handles overflows: a non-finite loss). Noticed at the next logged step, checkpoint or epoch end."""
    max_failures: int = 0
    """Worker-group restarts Ray Train may make after a failure (resuming from the latest checkpoint)."""
    compile: Any = False
    """torch.compile the model: false, true, or {mode, fullgraph, backend, dynamic} (see engine.prepare)."""
    activation_checkpointing: Any = False
    """Recompute activations in the backward instead of keeping them: false, true (every top-level layer) or a
    list of layer names (qualified module names, e.g. [net])."""
    start_timeout_s: float = 120.0
    """Seconds to wait for the workers' CPUs/GPUs to be free (their placement) before the run fails with one line,
    instead of waiting for ever (e.g. behind other runs or a search's trials on the same cluster)."""
    collective_timeout_s: float = 600.0
    """Seconds a collective (gradient all-reduce, barrier) waits for its peers before the run fails with one line
    naming the step and the ranks that did not arrive (a peer stopped, hung or its node gone); Ray then restarts
    from the latest checkpoint as max_failures allows. The process group's timeout (Ray's TorchConfig.timeout_s).
    Longer than the slowest step and checkpoint write."""
    resize_check_s: float = 60.0
    """With an elastic trainer.num_workers: seconds between Ray Train's checks for room to grow the worker group
    (nodes that joined); growing restarts the group from the newest checkpoint. Ray's default."""
    linear_probe: bool = False
    """After training, report test/probe_acc: a logistic regression fitted on the model's features (its predict)
    of the training split, C chosen on the validation split (in-memory data with class labels; see
    dtrain.launch.probe). The downstream score of a model trained without labels (an RBM)."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)

    def __post_init__(self) -> None:
        compile_options(self.compile)
        checkpoint_layers(self.activation_checkpointing)
        check(self.strategy in STRATEGIES, "trainer.strategy", "one of " + ", ".join(STRATEGIES), self.strategy)
        worker_bounds(self.num_workers)  # checks the value
        check(str(self.use_gpu).lower() in ("auto", "true", "false"), "trainer.use_gpu", "auto, true or false",
              self.use_gpu)
        check(self.cpus_per_worker > 0, "trainer.cpus_per_worker", "a number > 0", self.cpus_per_worker)
        check(self.precision in PRECISIONS, "trainer.precision", "one of " + ", ".join(PRECISIONS), self.precision)
        check(self.max_epochs >= 1, "trainer.max_epochs", "an integer >= 1", self.max_epochs)
        check(self.max_steps is None or self.max_steps >= 1, "trainer.max_steps", "an integer >= 1", self.max_steps)
        check(self.grad_accum >= 1, "trainer.grad_accum", "an integer >= 1", self.grad_accum)
        check(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip", "a number > 0 or null",
              self.grad_clip)
        check(self.grad_clip_mode in ("norm", "value"), "trainer.grad_clip_mode", "norm or value", self.grad_clip_mode)
        check(self.log_every_n_steps >= 1, "trainer.log_every_n_steps", "an integer >= 1", self.log_every_n_steps)
        check(self.max_nonfinite_steps >= 1, "trainer.max_nonfinite_steps", "an integer >= 1",
              self.max_nonfinite_steps)
        check(self.max_failures >= 0, "trainer.max_failures", "an integer >= 0", self.max_failures)
        check(self.collective_timeout_s >= 1, "trainer.collective_timeout_s", "a number of seconds >= 1",
              self.collective_timeout_s)
        check(self.start_timeout_s > 0, "trainer.start_timeout_s", "a number of seconds > 0", self.start_timeout_s)
        check(self.resize_check_s > 0, "trainer.resize_check_s", "a number of seconds > 0", self.resize_check_s)
        self._check_profile()
        # the strategy's own checks of its section against these settings (e.g. raw DeepSpeed keys that contradict
        # them), when the job loads
        strategy_class(self.strategy).check(getattr(self, self.strategy, None), precision=self.precision,
                                            grad_clip=self.grad_clip, grad_clip_mode=self.grad_clip_mode,
                                            grad_accum=self.grad_accum, compile=bool(self.compile),
                                            activation_checkpointing=bool(self.activation_checkpointing))


    def _check_profile(self) -> None:
        p = self.profile
        if not p.enabled:
            return
        fewest = (worker_bounds(self.num_workers) or (math.inf,))[0]
        check(max(p.ranks) < fewest, "trainer.profile.ranks", f"ranks below trainer.num_workers ({fewest})",
              list(p.ranks))
        check(self.max_steps is None or p.last_step <= self.max_steps, "trainer.profile",
              f"wait + warmup + active <= trainer.max_steps ({self.max_steps})", p.last_step)


TrainerConfig = dataclasses.make_dataclass(
    "TrainerConfig", [(name, options, field(default_factory=options)) for name, options in strategy_options().items()],
    bases=(TrainerBase,))
TrainerConfig.__module__ = __name__  # so that its instances pickle by reference
TrainerConfig.__doc__ = "The trainer section: TrainerBase plus trainer.<name> for each strategy with options."


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 1
    """Save a checkpoint every N epochs (0 disables epoch checkpoints)."""
    every_n_steps: int = 0
    """Also save every N optimizer steps (0 disables), for exact mid-epoch resume."""
    keep: int = 2
    """How many of the newest checkpoints are kept (older ones are deleted once a newer one is complete)."""
    background: bool = True
    """Write checkpoints in a background thread while training goes on (each is published at the first step
    boundary after every rank's write is done); false writes them on the training thread."""

    def __post_init__(self) -> None:
        check(self.every_n_epochs >= 0, "checkpoint.every_n_epochs", "an integer >= 0", self.every_n_epochs)
        check(self.every_n_steps >= 0, "checkpoint.every_n_steps", "an integer >= 0", self.every_n_steps)
        check(self.keep >= 1, "checkpoint.keep", "an integer >= 1", self.keep)


@dataclass
class WandbConfig:
    enabled: str = "auto"
    """auto (online with an API key, else offline), true (online; an API key is required unless mode says
    offline) or false (no W&B at all)."""
    project: str = "dtrain"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; null = the key's default entity."""
    group: str | None = None
    """Groups runs in the W&B UI (dtrain tune sets it to the search name)."""
    name: str | None = None
    """W&B run display name; null = the job name (dtrain tune sets it to the trial id)."""
    id: str | None = None
    """W&B run id (letters, digits, - and _); null = generated on the first start and kept in the run dir's
    wandb_id.txt, so resumes continue the same run. dtrain tune sets one per trial so its segments share a run."""
    tags: list[str] = field(default_factory=list)
    """W&B run tags."""
    mode: str | None = None
    """online, offline or disabled; overrides what `enabled` and WANDB_MODE chose."""
    log_every_n_steps: int | None = None
    """Send step metrics to W&B every N optimizer steps; null = every step trainer.log_every_n_steps logs."""
    log_checkpoint: bool = False
    """Upload the run's latest checkpoint folder as a W&B model artifact when training ends."""

    def __post_init__(self) -> None:
        check(str(self.enabled).lower() in ("auto", "true", "false"), "logging.wandb.enabled", "auto, true or false",
              self.enabled)
        check(self.mode in (None, "online", "offline", "disabled"), "logging.wandb.mode",
              "online, offline or disabled", self.mode)
        check(self.id is None or (0 < len(self.id) <= 64 and self.id.replace("-", "").replace("_", "").isalnum()),
              "logging.wandb.id", "1-64 letters, digits, - or _", self.id)
        check(self.log_every_n_steps is None or self.log_every_n_steps >= 1, "logging.wandb.log_every_n_steps",
              "an integer >= 1 or null", self.log_every_n_steps)


@dataclass
class TensorBoardConfig:
    enabled: bool = False
    """Write TensorBoard event files (the same values W&B receives)."""
    dir: str | None = None
    """Root folder of event files; the run's go in <dir>/<name>. null = <run dir>/tensorboard."""
    name: str | None = None
    """The run's folder under dir; null = the job name (dtrain tune sets it to <search>/<trial>)."""


@dataclass
class MlflowConfig:
    enabled: str = "auto"
    """auto (on when a tracking URI is set here or in MLFLOW_TRACKING_URI; a server that does not answer is a
    warning), true (a URI is required and must answer) or false."""
    tracking_uri: str | None = None
    """http(s)://host:port of an MLflow tracking server, or a store URI (sqlite:///..., a folder); null =
    MLFLOW_TRACKING_URI. Credentials go in MLflow's environment variables (MLFLOW_TRACKING_TOKEN, ...), never here."""
    experiment: str = "dtrain"
    """MLflow experiment (created if missing)."""
    run_name: str | None = None
    """Run name; null = the job name (dtrain tune sets it to the trial id)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags of the MLflow run."""
    log_checkpoint: bool = False
    """Upload the run's latest checkpoint folder as the artifact 'checkpoint' when training ends."""
    key: str | None = None
    """Continue the run tagged dtrain.key=<key> when the run dir has none yet (dtrain tune sets one per trial)."""
    parent_run_id: str | None = None
    """Nest the run under this MLflow run (dtrain tune sets its search's parent run)."""

    def __post_init__(self) -> None:
        check(str(self.enabled).lower() in ("auto", "true", "false"), "logging.mlflow.enabled", "auto, true or false",
              self.enabled)
        url = urlparse(self.tracking_uri or "")
        check(url.password is None, "logging.mlflow.tracking_uri", "a URI without a password (it would be saved in "
              "config.yaml; set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)",
              url._replace(netloc=f"{url.username}:***@{url.hostname}").geturl() if url.password else None)


@dataclass
class SystemMetricsConfig:
    enabled: bool = False
    """Sample each worker's CPU %, memory and (on GPUs) utilisation in a background thread, logged per rank as
    sys/<name>/rank<r> at every logged step."""
    interval_s: float = 1.0
    """Seconds between samples."""

    def __post_init__(self) -> None:
        check(self.interval_s > 0, "logging.system_metrics.interval_s", "a number > 0", self.interval_s)


@dataclass
class LoggingConfig:
    progress: bool = True
    """Show a progress bar on rank 0."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    system_metrics: SystemMetricsConfig = field(default_factory=SystemMetricsConfig)


@dataclass
class CostConfig:
    per_gpu_hour: float | None = None
    """Price of one GPU for one hour (any currency); with per_cpu_hour, summary.json and reports show money."""
    per_cpu_hour: float | None = None
    """Price of one CPU (a Ray CPU) for one hour."""

    def __post_init__(self) -> None:
        for key in ("per_gpu_hour", "per_cpu_hour"):
            value = getattr(self, key)
            check(value is None or value >= 0, f"cost.{key}", "a number >= 0 or null", value)


@dataclass
class JobConfig:
    name: str | None = None
    """Run name; the run directory is <runs_dir>/<name>. Default: job file stem plus a timestamp."""
    runs_dir: str = "runs"
    """Where run directories are created."""
    model: Any = None
    """Model section, validated against the config class of model.name."""
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    cost: CostConfig = field(default_factory=CostConfig)
    tune: Any = None
    """Search section for `dtrain tune` (see dtrain.launch.tune)."""

    def __post_init__(self) -> None:
        check(self.name is None or bool(RUN_NAME.fullmatch(self.name)) and self.name not in (".", ".."), "name",
              "a plain run name (letters, digits, '.', '_', '-'; no '/'), the folder under runs_dir", self.name)
        check(not self.trainer.linear_probe or not streams(self.data), "trainer.linear_probe",
              "false with streamed data (the probe fits on the whole training split, held in memory)", True)
        bounds = worker_bounds(self.trainer.num_workers)
        check(self.data.global_batch_size is not None or bounds is None or bounds[0] == bounds[1],
              "data.global_batch_size", f"a number with an elastic trainer.num_workers {list(bounds or ())} (the "
              "global batch must not change with the worker count)", None)
        if self.data.global_batch_size is not None:
            check(self.optim.descent == "minibatch", "data.global_batch_size", "null under optim.descent="
                  f"{self.optim.descent} (it fixes its own batch)", self.data.global_batch_size)
            if bounds is not None:  # else checked once the launcher knows the worker count
                check_global_batch(self.data.global_batch_size, range(bounds[0], bounds[1] + 1))


def worker_bounds(num_workers: Any) -> tuple[int, int] | None:
    """(min, max) workers of trainer.num_workers (a number n: (n, n)); None when null (chosen at launch)."""
    if num_workers is None:
        return None
    if isinstance(num_workers, int) and not isinstance(num_workers, bool):
        check(num_workers >= 1, "trainer.num_workers", "an integer >= 1", num_workers)
        return num_workers, num_workers
    pair = list(num_workers) if isinstance(num_workers, list | tuple | ListConfig) else None
    check(pair is not None and len(pair) == 2 and all(isinstance(n, int) and not isinstance(n, bool) for n in pair),
          "trainer.num_workers", "an integer >= 1, [min, max] or null", num_workers)
    check(pair[0] >= 1, "trainer.num_workers", "[min, max] with min >= 1", pair)
    check(pair[0] <= pair[1], "trainer.num_workers", "[min, max] with min <= max", pair)
    return pair[0], pair[1]


RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")
ENV_INTERPOLATION = re.compile(r"\$\{\s*(oc\.env|env)\s*:")


def _reject_env_interpolations(node: Any, where: str, prefix: str = "") -> None:
    """A job must say what it means: an ${oc.env:...} read from the environment would be resolved silently into
    the run's config.yaml (and differ between the driver and the workers of a cluster)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _reject_env_interpolations(value, where, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _reject_env_interpolations(value, where, f"{prefix}{i}.")
    elif isinstance(node, str) and ENV_INTERPOLATION.search(node):
        raise ConfigError(f"{where}: {prefix[:-1]}: {node!r} reads an environment variable, which a job may not do "
                          "(write the value, or pass it as an override: key=$VARIABLE)")


def _check_finite(obj: Any, prefix: str = "") -> None:
    """No float field of the job is inf or NaN (e.g. optim.lr=1e400 parses as inf)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float):
            check(math.isfinite(value), f"{prefix}{f.name}", "a finite number", value)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                check(not isinstance(item, float) or math.isfinite(item), f"{prefix}{f.name}.{i}", "a finite number",
                      item)


_NOT_CONVERTED = re.compile(r"Value '(.*)' (?:of type '\w+' could not be converted to (\w+)|is not a valid (bool))")
"""OmegaConf's message for a value of the wrong type: the value, and the type (Integer, Float, ... or bool)."""
_EXPECTED = {"Integer": "an integer", "Float": "a number", "bool": "true or false"}


def _schema_error(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err)
    msg = msg.splitlines()[0].strip()
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return ConfigError(f"{where}: unknown key '{key}'")
    if "is not Optional" in msg or msg.startswith("Incompatible value 'None'"):  # `key=` or `key=null`
        return ConfigError(f"{where}: {key}: expected a value, got an empty or null one")
    if (wrong := _NOT_CONVERTED.match(msg)) and key:
        value, kind = wrong[1], wrong[2] or wrong[3]
        return ConfigError(f"{where}: {key}: expected {_EXPECTED.get(kind, kind.lower())}, got {value}")
    return ConfigError(f"{where}: {key}: {msg}" if key else f"{where}: {msg}")


def load_job(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), base: dict | None = None
) -> DictConfig:
    """Load a job spec from YAML (or a dict), apply ``key=value`` overrides, validate, and return it resolved."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: job file not found")
        try:
            user = OmegaConf.load(path)
        except Exception as err:  # yaml errors carry multi-line context; keep the first line
            if "Invalid loaded object type" in str(err):
                raise ConfigError(f"{path}: expected a mapping of sections (model, data, trainer, ...)") from None
            raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
        if not isinstance(user, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of sections (model, data, optim, trainer, ...)")
        where = str(path)
    else:
        user, where = OmegaConf.create(base or {}), "job"
    for item in overrides:
        if "=" not in item or not item.split("=", 1)[0]:
            raise ConfigError(f"override '{item}': expected key=value")
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except Exception as err:
        raise ConfigError(f"overrides: {str(err).splitlines()[0]}") from None
    merged = OmegaConf.merge(user, dotlist)
    _reject_env_interpolations(OmegaConf.to_container(merged, resolve=False), where)
    return build_job(merged, where)


def build_job(user: DictConfig, where: str = "job") -> DictConfig:
    """Validate a user config against the schema (model section by the model's own class)."""
    from dtrain.models import model_config_class  # local: the registry imports model code

    model_section = user.get("model") or OmegaConf.create({})
    model_name = model_section.get("name") if isinstance(model_section, DictConfig) else None
    if not model_name:
        raise ConfigError(f"{where}: model.name: required (see `dtrain models`)")
    model_cls = model_config_class(str(model_name))
    try:
        schema = OmegaConf.structured(JobConfig)
        schema.model = OmegaConf.structured(model_cls)
        OmegaConf.set_struct(schema, True)
        _open_free_form(schema)
        tune = user.get("tune") if "tune" in user else None
        rest = OmegaConf.masked_copy(user, [k for k in user.keys() if k != "tune"])
        merged = OmegaConf.merge(schema, rest)
        if tune is not None:
            with open_dict(merged):
                merged.tune = tune
        # Build the dataclasses once so that every __post_init__ check runs on the final values.
        _check_finite(OmegaConf.to_object(merged))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except OmegaConfBaseException as err:
        raise _schema_error(err, where) from None
    return merged


def _open_free_form(node: DictConfig) -> None:
    """Let the schema's plain-dict fields (data.options, trainer.deepspeed.config, ...) take any keys: whoever
    reads them checks them (each data set its options, DeepSpeed its raw keys)."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            if OmegaConf.get_type(child) is dict:
                OmegaConf.set_struct(child, False)
            else:
                _open_free_form(child)


def to_dict(cfg: DictConfig) -> dict:
    """A plain, resolved dict (what travels to Ray workers and is written to config.yaml)."""
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def to_objects(cfg: DictConfig | dict) -> Any:
    """The job as dataclass instances (JobConfig with the model's own config class)."""
    if isinstance(cfg, dict):
        cfg = build_job(OmegaConf.create(cfg))
    return OmegaConf.to_object(cfg)


def fields_doc(cls: type) -> list[tuple[str, str, Any]]:
    """(name, type, default) of a config dataclass, for `dtrain models`."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append((f.name, str(f.type), default))
    return out
