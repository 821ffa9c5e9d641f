"""The job spec: one dataclass per section, merged by omegaconf from YAML and ``key=value`` overrides.

The ``model`` section is validated against the config class that the chosen model registers (``model.name``),
so a typo in a model field is caught just like a typo anywhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain.errors import ConfigError

PRECISIONS = ("32", "bf16-mixed", "fp16-mixed")
STRATEGIES = ("ddp", "deepspeed")


@dataclass
class DataConfig:
    name: str = "digits"
    """Data set name from the registry (`dtrain models` lists them), e.g. digits, adding, npz."""
    path: str | None = None
    """File for file-backed data sets (npz, csv, idx)."""
    batch_size: int = 64
    """Mini-batch size per worker; global batch = batch_size x workers x grad_accum."""
    val_fraction: float = 0.1
    """Share of the non-test data held out for validation (ignored when the data set has its own split)."""
    test_fraction: float = 0.2
    """Share of the data held out for testing (ignored when the data set has its own split)."""
    seed: int = 0
    """Seed of the train/val/test split."""
    standardize: bool = True
    """Scale features to zero mean and unit variance using training statistics only."""
    minmax: bool = False
    """Rescale each feature to [0, 1] with the training split's min and max (clipped), e.g. for Bernoulli RBMs;
    needs standardize=false."""
    fourier: bool = False
    """Append the FFT magnitude spectrum of each sequence/signal to its features."""
    options: dict[str, Any] = field(default_factory=dict)
    """Data-set specific keyword arguments, e.g. {seq_len: 50} for adding."""

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", "an integer >= 1", self.batch_size)
        _check(0 <= self.val_fraction < 1, "data.val_fraction", "a number in [0, 1)", self.val_fraction)
        _check(0 <= self.test_fraction < 1, "data.test_fraction", "a number in [0, 1)", self.test_fraction)
        _check(not (self.minmax and self.standardize), "data.minmax", "standardize=false alongside minmax=true",
               "standardize=true")


@dataclass
class OptimConfig:
    name: str = "adam"
    """Optimizer: sgd, adam or adamw."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.0
    """L2 penalty (decoupled for adamw)."""
    momentum: float = 0.9
    """Momentum for sgd."""
    scheduler: str = "none"
    """Learning-rate schedule: none, cosine, step or linear (linear warm-up to lr, then linear decay)."""
    warmup_steps: int = 0
    """Steps of linear warm-up before the schedule."""
    step_size: int = 10
    """Epochs between decays for the step scheduler."""
    gamma: float = 0.5
    """Decay factor for the step scheduler."""
    descent: str = "minibatch"
    """Gradient-descent variant: minibatch (data.batch_size), batch (whole training set per step) or stochastic
    (one sample per worker per step)."""

    def __post_init__(self) -> None:
        _check(self.name in ("sgd", "adam", "adamw"), "optim.name", "one of sgd, adam, adamw", self.name)
        _check(self.lr > 0, "optim.lr", "a number > 0", self.lr)
        _check(self.weight_decay >= 0, "optim.weight_decay", "a number >= 0", self.weight_decay)
        schedulers = ("none", "cosine", "step", "linear")
        _check(self.scheduler in schedulers, "optim.scheduler", "one of " + ", ".join(schedulers), self.scheduler)
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "an integer >= 0", self.warmup_steps)
        descents = ("minibatch", "batch", "stochastic")
        _check(self.descent in descents, "optim.descent", "one of " + ", ".join(descents), self.descent)


@dataclass
class EarlyStoppingConfig:
    monitor: str | None = None
    """Validation metric to watch, e.g. val/loss or val/acc; null disables early stopping."""
    mode: str = "min"
    """min or max: which direction is better."""
    patience: int = 5
    """Epochs without improvement before stopping."""
    min_delta: float = 0.0
    """Smallest change that counts as an improvement."""

    def __post_init__(self) -> None:
        _check(self.mode in ("min", "max"), "trainer.early_stopping.mode", "min or max", self.mode)
        _check(self.patience >= 1, "trainer.early_stopping.patience", "an integer >= 1", self.patience)


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 0
    """ZeRO stage 0-3."""
    offload_optimizer: bool = False
    """Keep optimizer state on the CPU (ZeRO 1-3)."""
    offload_params: bool = False
    """Keep parameters on the CPU (ZeRO 3)."""
    config: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys, merged on top of the translated config."""

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "trainer.deepspeed.zero_stage", "0, 1, 2 or 3", self.zero_stage)


@dataclass
class TrainerConfig:
    strategy: str = "ddp"
    """ddp or deepspeed."""
    num_workers: int | None = None
    """Training workers; null = one per GPU when GPUs are present, otherwise 2."""
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
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self) -> None:
        _check(self.strategy in STRATEGIES, "trainer.strategy", "ddp or deepspeed", self.strategy)
        _check(self.num_workers is None or self.num_workers >= 1, "trainer.num_workers", "an integer >= 1",
               self.num_workers)
        _check(str(self.use_gpu).lower() in ("auto", "true", "false"), "trainer.use_gpu", "auto, true or false",
               self.use_gpu)
        _check(self.precision in PRECISIONS, "trainer.precision", "one of " + ", ".join(PRECISIONS), self.precision)
        _check(self.max_epochs >= 1, "trainer.max_epochs", "an integer >= 1", self.max_epochs)
        _check(self.max_steps is None or self.max_steps >= 1, "trainer.max_steps", "an integer >= 1", self.max_steps)
        _check(self.grad_accum >= 1, "trainer.grad_accum", "an integer >= 1", self.grad_accum)
        _check(self.grad_clip is None or self.grad_clip > 0, "trainer.grad_clip", "a number > 0 or null",
               self.grad_clip)
        _check(self.grad_clip_mode in ("norm", "value"), "trainer.grad_clip_mode", "norm or value", self.grad_clip_mode)
        _check(self.log_every_n_steps >= 1, "trainer.log_every_n_steps", "an integer >= 1", self.log_every_n_steps)
        _check(self.max_failures >= 0, "trainer.max_failures", "an integer >= 0", self.max_failures)
        if self.strategy == "deepspeed":  # raw DeepSpeed keys that contradict our own fields fail at load time
            from dtrain.engine.deepspeed import deepspeed_config  # (does not import deepspeed itself)

            deepspeed_config(self)


@dataclass
class CheckpointConfig:
    every_n_epochs: int = 1
    """Save a checkpoint every N epochs (0 disables epoch checkpoints)."""
    every_n_steps: int = 0
    """Also save every N optimizer steps (0 disables), for exact mid-epoch resume."""
    keep: int = 2
    """Checkpoints kept by Ray Train (the newest ones)."""

    def __post_init__(self) -> None:
        _check(self.every_n_epochs >= 0, "checkpoint.every_n_epochs", "an integer >= 0", self.every_n_epochs)
        _check(self.every_n_steps >= 0, "checkpoint.every_n_steps", "an integer >= 0", self.every_n_steps)
        _check(self.keep >= 1, "checkpoint.keep", "an integer >= 1", self.keep)


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
        _check(str(self.enabled).lower() in ("auto", "true", "false"), "logging.wandb.enabled", "auto, true or false",
               self.enabled)
        _check(self.mode in (None, "online", "offline", "disabled"), "logging.wandb.mode",
               "online, offline or disabled", self.mode)
        _check(self.id is None or (0 < len(self.id) <= 64 and self.id.replace("-", "").replace("_", "").isalnum()),
               "logging.wandb.id", "1-64 letters, digits, - or _", self.id)
        _check(self.log_every_n_steps is None or self.log_every_n_steps >= 1, "logging.wandb.log_every_n_steps",
               "an integer >= 1 or null", self.log_every_n_steps)


@dataclass
class LoggingConfig:
    progress: bool = True
    """Show a progress bar on rank 0."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


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
    tune: Any = None
    """Search section for `dtrain tune` (see dtrain.launch.tune)."""


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def _schema_error(err: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    msg = getattr(err, "msg", None) or str(err)
    msg = msg.splitlines()[0].strip()
    if "not in struct" in msg or "Key '" in msg and "not in" in msg:
        return ConfigError(f"{where}: unknown key '{key}'")
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
    return build_job(OmegaConf.merge(user, dotlist), where)


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
        OmegaConf.set_struct(schema.data.options, False)  # free-form: each data set checks its own options
        OmegaConf.set_struct(schema.trainer.deepspeed.config, False)  # free-form: raw keys DeepSpeed checks
        tune = user.get("tune") if "tune" in user else None
        rest = OmegaConf.masked_copy(user, [k for k in user.keys() if k != "tune"])
        merged = OmegaConf.merge(schema, rest)
        if tune is not None:
            with _unstruct(merged):
                merged.tune = tune
        # Build the dataclasses once so that every __post_init__ check runs on the final values.
        OmegaConf.to_object(merged)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except OmegaConfBaseException as err:
        raise _schema_error(err, where) from None
    return merged


class _unstruct:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> DictConfig:
        OmegaConf.set_struct(self.cfg, False)
        return self.cfg

    def __exit__(self, *exc: object) -> None:
        OmegaConf.set_struct(self.cfg, True)


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
