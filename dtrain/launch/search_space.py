"""The `tune.space` mini-language: `key: loguniform(1e-4, 1e-1)` and friends, parsed into checked Param objects.

Syntax (one expression per config key; arguments are YAML flow values, so bare words and nested lists work):
  uniform(a, b)        float in [a, b]
  loguniform(a, b)     float in [a, b], log-spaced (0 < a < b)
  quniform(a, b, q)    float in [a, b] rounded to a multiple of q
  randint(a, b)        integer in [a, b) (Ray Tune's convention: upper bound excluded)
  choice([x, y, ...])  one of the listed values (numbers, words, lists such as [128, 64])
  grid([x, y, ...])    every listed value (grid search)
Keys under `arch.` are derived, not job keys: `arch.depth` and `arch.width` set `model.hidden` to
`[width] * depth` (for models with a `hidden` list), so depth and width can be searched independently.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from dtrain.errors import ConfigError

_EXPR = re.compile(r"^\s*([a-z_]+)\s*\((.*)\)\s*$", re.DOTALL)
SYNTAX = "uniform(a, b), loguniform(a, b), quniform(a, b, q), randint(a, b), choice([...]) or grid([...])"
DERIVED = ("arch.depth", "arch.width")


@dataclass(frozen=True)
class Param:
    """One searched key: its distribution kind and arguments (values for choice/grid, bounds otherwise)."""

    key: str
    kind: str
    args: tuple

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    @property
    def encoded(self) -> bool:
        """Whether options travel to the searcher as JSON strings (optuna/hyperopt only take scalars)."""
        return self.categorical and any(not _scalar(v) for v in self.args)

    def candidates(self) -> list[Any]:
        """Values that must all be valid for the job: every option, or both ends of a range."""
        if self.categorical:
            return list(self.args)
        lo, hi = self.args[0], self.args[1]
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]

    def domain(self, grid: bool = False) -> Any:
        """The Ray Tune search domain for this parameter (grid=True: categorical values as a grid)."""
        from ray import tune

        if self.categorical:
            options = [json.dumps(v) for v in self.args] if self.encoded else list(self.args)
            return tune.grid_search(options) if grid or self.kind == "grid" else tune.choice(options)
        return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
                "quniform": tune.quniform}[self.kind](*self.args)

    def decode(self, value: Any) -> Any:
        """The config value for what the searcher sampled."""
        if self.encoded and isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:  # already decoded (a plain word among the options)
                return value
        return value

    def describe(self) -> str:
        inner = json.dumps(list(self.args)) if self.categorical else ", ".join(map(str, self.args))
        return f"{self.kind}({inner})"


_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _floats(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string; read such strings as the numbers they are meant to be."""
    if isinstance(value, str) and _FLOAT.match(value.strip()):
        return float(value)
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str)


def flatten_space(space: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted.key: expression} from a mapping that may be nested (optim: {lr: ...}) or dotted (optim.lr: ...)."""
    if not isinstance(space, dict):
        raise ConfigError(f"tune.space{('.' + prefix) if prefix else ''}: expected a mapping of config keys to "
                          f"search expressions, got {space!r}")
    out: dict[str, Any] = {}
    for key, value in space.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten_space(value, full))
        else:
            out[full] = value
    return out


def parse_param(key: str, expr: Any) -> Param:
    """Parse one `key: expression`; a ConfigError names tune.space.<key> and the expected syntax."""
    where = f"tune.space.{key}"
    match = _EXPR.match(expr) if isinstance(expr, str) else None
    if match is None:
        raise ConfigError(f"{where}: expected {SYNTAX}, got {expr!r}")
    kind, inner = match.group(1), match.group(2)
    try:
        args = yaml.safe_load(f"[{inner}]")
    except yaml.YAMLError:
        raise ConfigError(f"{where}: cannot read the arguments of {kind}(...) in {expr!r}") from None
    args = _floats(args)
    checker = _CHECKERS.get(kind)
    if checker is None:
        raise ConfigError(f"{where}: unknown distribution {kind!r}; expected {SYNTAX}")
    return Param(key, kind, checker(where, kind, args))


def _bounds(where: str, kind: str, args: list) -> tuple:
    n = 3 if kind == "quniform" else 2
    form = f"{kind}(a, b, q)" if n == 3 else f"{kind}(a, b)"
    integer = kind == "randint"
    ok_type = all(isinstance(a, int) and not isinstance(a, bool) if integer else _number(a) for a in args)
    if len(args) != n or not ok_type:
        what = "integers" if integer else "numbers"
        raise ConfigError(f"{where}: expected {form} with {what}, got {kind}({', '.join(map(repr, args))})")
    lo, hi = args[0], args[1]
    if not lo < hi:
        raise ConfigError(f"{where}: expected {form} with a < b, got a={lo!r}, b={hi!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: expected loguniform(a, b) with 0 < a < b, got a={lo!r}")
    if n == 3 and args[2] <= 0:
        raise ConfigError(f"{where}: expected quniform(a, b, q) with q > 0, got q={args[2]!r}")
    return tuple(float(a) if not integer else a for a in args)


def _options(where: str, kind: str, args: list) -> tuple:
    if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
        raise ConfigError(f"{where}: expected {kind}([value, ...]) with a non-empty list, got {kind}{tuple(args)!r}")
    return tuple(args[0])


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_CHECKERS = {"uniform": _bounds, "loguniform": _bounds, "quniform": _bounds, "randint": _bounds,
             "choice": _options, "grid": _options}


def parse_space(space: Any) -> dict[str, Param]:
    """All parameters of a tune.space mapping, parsed and syntax-checked (not yet checked against the job)."""
    flat = flatten_space(space)
    if not flat:
        raise ConfigError("tune.space: expected at least one key to search, e.g. optim.lr: loguniform(1e-4, 1e-1)")
    params = {key: parse_param(key, expr) for key, expr in flat.items()}
    for key in params:
        if key.startswith("arch.") and key not in DERIVED:
            raise ConfigError(f"tune.space.{key}: unknown derived key; expected one of {', '.join(DERIVED)}")
    return params


def apply_params(job: dict, params: dict[str, Param], sample: dict[str, Any]) -> dict:
    """A copy of the plain job dict with the sampled values set (derived arch.* keys mapped to model.hidden)."""
    import copy

    out = copy.deepcopy(job)
    arch: dict[str, Any] = {}
    for key, param in params.items():
        if key not in sample:
            continue
        value = param.decode(sample[key])
        if key.startswith("arch."):
            arch[key.split(".", 1)[1]] = value
        else:
            set_dotted(out, key, value)
    if arch:
        hidden = (out.get("model") or {}).get("hidden") or [128]
        depth = int(arch.get("depth", len(hidden)))
        width = int(arch.get("width", hidden[0]))
        set_dotted(out, "model.hidden", [width] * depth)
    return out


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """tree[a][b][c] = value for key 'a.b.c', creating mappings on the way."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


SCHEDULERS = ("fifo", "asha", "pbt")
SEARCH_ALGS = ("random", "grid", "optuna", "hyperopt")
# PBT copies weights between trials, so it may only perturb keys that leave the parameter shapes alone.
PBT_MUTABLE = ("optim.lr", "optim.weight_decay", "optim.momentum", "model.dropout", "trainer.grad_clip",
               "data.batch_size")


@dataclass
class BudgetConfig:
    """tune.budget: limits of a whole search; null = no limit on that measure."""

    gpu_hours: float | None = None
    """GPU-hours all trials together may use."""
    cpu_hours: float | None = None
    """CPU-hours all trials together may use."""
    cost: float | None = None
    """Money all trials together may cost (needs the job's cost section: per_gpu_hour, per_cpu_hour)."""

    def __post_init__(self) -> None:
        for key in ("gpu_hours", "cpu_hours", "cost"):
            value = getattr(self, key)
            _check(value is None or (value > 0 and value != float("inf")), f"tune.budget.{key}",
                  "a finite number > 0 or null", value)

    def limits(self) -> dict[str, float]:
        """{measure: limit} of the measures that have one."""
        return {k: v for k, v in (("gpu_hours", self.gpu_hours), ("cpu_hours", self.cpu_hours),
                                  ("cost", self.cost)) if v is not None}


@dataclass
class TuneConfig:
    """The `tune:` section of a job spec, read by `dtrain tune`."""

    space: dict[str, Any] = field(default_factory=dict)
    """Searched config keys -> expressions, e.g. {optim.lr: loguniform(1e-4, 1e-1)} (see this module's doc)."""
    metric: str = "val/loss"
    """Epoch metric to optimise, as the workers report it (val/loss, val/acc, train/loss, ...): one that every
    candidate of the space logs, checked before any trial starts."""
    mode: str = "min"
    """min or max."""
    num_samples: int | None = None
    """Trials to sample; null = 8, or 1 for grid (where it counts passes over every combination)."""
    max_concurrent_trials: int | None = None
    """Trials running at once; null = as many as the cluster fits (always capped so trials cannot deadlock)."""
    scheduler: str = "fifo"
    """fifo (run every trial to the end), asha (stop bad trials early) or pbt (population based training)."""
    search_alg: str = "random"
    """random, grid (every combination of choice values), optuna (TPE) or hyperopt (TPE)."""
    seed: int | None = 0
    """Seed of the search algorithm; null = not reproducible."""
    grace_period: int = 1
    """asha: epochs every trial runs before it can be stopped."""
    reduction_factor: float = 2
    """asha: keep the best 1/reduction_factor of trials at each rung."""
    perturbation_interval: int = 2
    """pbt: epochs between exploit/explore steps (a multiple of checkpoint.every_n_epochs)."""
    quantile_fraction: float = 0.25
    """pbt: the bottom fraction copies the top fraction's weights and perturbed hyperparameters."""
    synch: bool = False
    """pbt: each trial waits at every perturbation until all live trials reach it, then the bottom fraction exploits
    (Ray's synchronous PBT). Every interval then exploits, however unevenly the trials run; a trial that is ahead
    idles meanwhile. false = each trial is compared with the others' latest scores when it reaches the interval."""
    trial_cpus: float = 0
    """CPUs reserved for each trial's driver function; the Ray Train controller and workers come on top."""
    time_budget_s: float | None = None
    """Stop starting and running trials after this many seconds (a fixed compute budget); null = no limit."""
    budget: BudgetConfig | None = None
    """{gpu_hours, cpu_hours, cost}: no trial is launched that would exceed it, running ones end when it is reached
    (see dtrain.launch.budget); null = no budget."""
    keep_checkpoints: int | None = None
    """Checkpoints Tune keeps per trial (for --resume and pbt exploits); null = 2, or all of them under pbt, where
    an exploit may copy a checkpoint of a trial that has kept training since."""

    def __post_init__(self) -> None:
        _check(self.mode in ("min", "max"), "tune.mode", "min or max", self.mode)
        _check(self.num_samples is None or self.num_samples >= 1, "tune.num_samples", "an integer >= 1 or null",
               self.num_samples)
        if self.num_samples is None:
            self.num_samples = 1 if self.search_alg == "grid" else 8
        _check(self.max_concurrent_trials is None or self.max_concurrent_trials >= 1, "tune.max_concurrent_trials",
               "an integer >= 1 or null", self.max_concurrent_trials)
        _check(self.scheduler in SCHEDULERS, "tune.scheduler", " | ".join(SCHEDULERS), self.scheduler)
        _check(self.search_alg in SEARCH_ALGS, "tune.search_alg", " | ".join(SEARCH_ALGS), self.search_alg)
        _check(self.grace_period >= 1, "tune.grace_period", "an integer >= 1", self.grace_period)
        _check(self.reduction_factor > 1, "tune.reduction_factor", "a number > 1", self.reduction_factor)
        _check(self.perturbation_interval >= 1, "tune.perturbation_interval", "an integer >= 1",
               self.perturbation_interval)
        _check(0 < self.quantile_fraction <= 0.5, "tune.quantile_fraction", "a number in (0, 0.5]",
               self.quantile_fraction)
        _check(self.trial_cpus >= 0, "tune.trial_cpus", "a number >= 0", self.trial_cpus)
        _check(self.time_budget_s is None or self.time_budget_s > 0, "tune.time_budget_s", "a number > 0 or null",
               self.time_budget_s)
        _check(self.keep_checkpoints is None or self.keep_checkpoints >= 1, "tune.keep_checkpoints",
               "an integer >= 1 or null", self.keep_checkpoints)


def _check(ok: bool, key: str, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}: expected {expected}, got {got!r}")


def read_tune_section(section: Any) -> tuple[TuneConfig, dict[str, Param]]:
    """Validate a job's `tune:` section (a plain dict): the TuneConfig and its parsed, combination-checked space."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(section, dict) or not section:
        raise ConfigError("tune: the job has no tune section; add tune: {metric: ..., space: {...}} "
                          "(see jobs/tune_mlp_digits.yaml)")
    space = section.get("space")
    rest = {k: v for k, v in section.items() if k != "space"}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TuneConfig), rest)
        cfg: TuneConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or ""
        msg = (getattr(err, "msg", None) or str(err)).splitlines()[0]
        if "not in struct" in msg or "not in" in msg and "Key" in msg:
            raise ConfigError(f"tune: unknown key '{key}'") from None
        raise ConfigError(f"tune.{key}: {msg}" if key else f"tune: {msg}") from None
    params = parse_space(space if space is not None else {})
    cfg.space = {k: p.describe() for k, p in params.items()}
    _check_combination(cfg, params)
    return cfg, params


def _check_combination(cfg: TuneConfig, params: dict[str, Param]) -> None:
    for key, param in params.items():
        if cfg.search_alg == "grid" and not param.categorical:
            raise ConfigError(f"tune.space.{key}: search_alg grid needs choice([...]) or grid([...]), "
                              f"got {param.describe()}")
        if param.kind == "grid" and cfg.search_alg != "grid":
            raise ConfigError(f"tune.space.{key}: grid([...]) needs tune.search_alg: grid; use choice([...]) "
                              f"with {cfg.search_alg}")
        if cfg.scheduler == "pbt" and key not in PBT_MUTABLE:
            raise ConfigError(f"tune.space.{key}: pbt copies weights between trials, so it can only perturb "
                              f"{', '.join(PBT_MUTABLE)}; search {key} with asha or fifo")
    if cfg.scheduler == "pbt" and cfg.search_alg != "random":
        raise ConfigError(f"tune.search_alg: pbt samples its population itself; expected random, "
                          f"got {cfg.search_alg!r}")


def check_against_job(job: dict, params: dict[str, Param], metric: str | None = None) -> list[dict]:
    """Set every candidate value of every key in the job and validate it (schema, then a model build), so an
    unknown key or a bad option fails here, naming tune.space.<key>, before any trial starts; returns the jobs.
    metric: the search's tune.metric, which every candidate must log (an architecture may log other metrics)."""
    import torch
    from omegaconf import OmegaConf

    from dtrain.config import build_job, to_dict, to_objects
    from dtrain.data import load_data
    from dtrain.data.stream_source import describe
    from dtrain.engine.loop import check_watched_metrics
    from dtrain.errors import DtrainError
    from dtrain.models import build_model

    loaded: dict[str, Any] = {}
    built = []
    for key, param in params.items():
        for value in param.candidates():
            sample = {key: json.dumps(value) if param.encoded else value}
            try:
                cfg = build_job(OmegaConf.create(apply_params(job, params, sample)), "job")
                obj = to_objects(cfg)
                data_key = json.dumps(to_dict(cfg)["data"], sort_keys=True, default=str)
                streamed = obj.data.name == "parquet"  # its files' metadata only, as `dtrain train` checks them
                if data_key not in loaded:  # data sets load once, unless a data.* key is searched
                    loaded[data_key] = describe(obj.data) if streamed else load_data(obj.data)
                data = loaded[data_key]
                if streamed:
                    with torch.device("meta"):
                        build_model(obj.model, data.meta)
                else:
                    check_watched_metrics(obj.model, data, obj.trainer.early_stopping.monitor, metric)
            except DtrainError as err:
                msg = str(err).removeprefix("job: ")
                raise ConfigError(f"tune.space.{key}: {value!r} does not fit the job: {msg}") from None
            built.append(to_dict(cfg))
    return built
