"""`dtrain tune`: a Ray Tune search whose trials are full dtrain training runs (Ray Train V2 inside each trial).

Each trial is a small driver function that runs `fit_job` (a TorchTrainer with its own DDP/DeepSpeed workers) and
forwards every epoch's metrics and checkpoint to Tune, so ASHA can stop it and PBT can copy its weights. Tune
reserves only the driver's resources; the workers are placed by Ray Train afterwards, so the number of concurrent
trials is capped at what the cluster fits in full, otherwise trials could hold the CPUs their workers wait for.

Layout: runs/<search>/ holds Tune's state (for --resume), job.yaml (the search spec), results.csv and best.yaml;
runs/<search>/trials/<trial>/run<k>/ is the trial's dtrain run (k > 0 after a PBT exploit or a resume).
"""

from __future__ import annotations

import json
import math
import posixpath
import re
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from ray.train.v2.api.callback import UserCallback

from dtrain.compat.ray import abort_train_run, tune_interruption
from dtrain.config import build_job, to_dict, to_objects
from dtrain.data.stream_source import describe
from dtrain.errors import ConfigError, DtrainError
from dtrain.launch.project import shipped_paths
from dtrain.launch.search_space import Param, TuneConfig, apply_params, check_against_job, read_tune_section
from dtrain.storage import RunStore, is_uri, join, probe, read_text, subfolders, write_text
from dtrain.tracking import SUMMARY_FILE
from dtrain.tracking.mlflow_sink import MLFLOW_ID_FILE, end_search_run, start_search_run

JOB_FILE = "job.yaml"
RESULTS_FILE = "results.csv"
BEST_FILE = "best.yaml"
COST_FILE = "cost.json"


class ForwardReports(UserCallback):
    """Runs in the Ray Train controller: hands each report (rank 0's metrics, checkpoint) to the trial."""

    def __init__(self, queue: Any) -> None:
        self.queue, self.sent_handle = queue, False

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        import ray

        item = {"metrics": dict(metrics[0]), "checkpoint": checkpoint}  # its path and filesystem (a bucket's)
        if not self.sent_handle:  # the trial aborts the run through it when Tune stops the trial
            item["controller"] = ray.get_runtime_context().current_actor
            self.sent_handle = True
        self.queue.put(item)


def run_trial(config: dict[str, Any], setup: dict[str, Any]) -> None:
    """Tune's trial function: one dtrain run of the sampled job, reporting each epoch (and checkpoint) to Tune."""
    from ray import tune
    from ray.util.queue import Queue

    from dtrain.launch.project import use_paths
    from dtrain.launch.train import fit_job

    use_paths(setup.get("sys_path", ()))  # before the job names the user's code
    trial_id = tune.get_context().get_trial_id()
    trial_dir = _location(join(setup["search_dir"], "trials", trial_id))
    segment = len(subfolders(trial_dir, "run"))
    job = build_job(OmegaConf.create(trial_job(setup["base"], setup["params"], config, setup["search_name"],
                                               trial_id)))
    job.runs_dir, job.name = str(trial_dir), f"run{segment}"
    # data.name=parquet: this trial's files, from their metadata (a searched data.* key may change them), streamed
    data = describe(to_objects(job).data) if job.data.name == "parquet" else None
    init = _initial_checkpoint(trial_dir, f"init{segment}")
    meter = _trial_meter(job, [_at(trial_dir, f"run{k}") for k in range(segment)])
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    acks = Queue(actor_options={"num_cpus": 0})  # each report's id, once Tune took it: the run waits for them
    outcome: dict[str, Any] = {}

    def train() -> None:
        try:
            fit_job(job, callbacks=[ForwardReports(queue)], init_checkpoint=init, data=data,
                    stream_tasks=setup.get("stream_tasks"), report_acks=acks)
        except BaseException as err:  # noqa: BLE001 - handed to the trial thread, which re-raises it
            outcome["error"] = err
        finally:
            queue.put(None)

    thread = threading.Thread(target=train, name="dtrain-trial", daemon=True)
    thread.start()
    _forward(queue, acks, setup["metric"], meter)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]


def _trial_meter(job: DictConfig, earlier: list[Path | RunStore]) -> Any:
    """A function giving the trial's cumulative cost so far (its earlier segments' recorded cost, plus this one's
    worker group held since now), under budget.TRIAL_KEYS, as each result carries it for tune.budget."""
    import time

    from dtrain.launch.budget import TRIAL_KEYS
    from dtrain.launch.cost import price, run_cost, sum_costs
    from dtrain.launch.train import resolve_resources, worker_group

    rates = to_dict(job.cost)
    before = sum_costs([run_cost(p, rates) for p in earlier])
    group, started = worker_group(job, *resolve_resources(job)), time.time()

    def meter() -> dict[str, float]:
        now = price(group.hours(time.time() - started), rates)
        return {key: before.get(k, 0.0) + now[k] for k, key in TRIAL_KEYS.items() if k in now}

    return meter


def _forward(queue: Any, acks: Any, metric: str, meter: Any = dict) -> None:
    """Report queued epoch results to Tune until the run ends, acknowledging each on acks once Tune took it (the
    run's next report waits for that: train.TakenReports); if Tune stops the trial, abort the Train run.
    meter: the trial's cost so far, added to every result."""
    from ray import tune

    from dtrain.launch.train import REPORT_ID

    controller = None
    try:
        while (item := queue.get()) is not None:
            controller = item.get("controller", controller)
            report_id = item["metrics"].pop(REPORT_ID, None)
            if metric in item["metrics"]:  # mid-epoch checkpoints carry no validation metrics
                # returns once Tune acted on the result and asks for the next (raises if it stops the trial)
                tune.report(item["metrics"] | meter(), checkpoint=item["checkpoint"])
            if report_id is not None:
                acks.put(report_id)
    except BaseException:  # Tune stops a trial by raising SystemExit out of tune.report
        if controller is not None:
            abort_train_run(controller)
        raise


def trial_job(base: dict, params: dict[str, Param], sample: dict[str, Any], search_name: str,
              trial_id: str = "trial") -> dict:
    """The job a trial trains: the search's job with the sampled values and no tune section; one tracker run per
    trial (grouped by search, named by trial, one run shared by the trial's segments after PBT exploits/resumes):
    W&B by group and id, TensorBoard by folder <dir>/<search>/<trial>, MLflow nested under the search's parent run
    (logging.mlflow.parent_run_id, set by run_search) and found again by its key."""
    job = apply_params(base, params, sample)
    job.pop("tune", None)
    wandb = job.setdefault("logging", {}).setdefault("wandb", {})
    wandb["group"] = wandb.get("group") or search_name
    wandb["name"] = wandb.get("name") or trial_id
    wandb["id"] = re.sub(r"[^A-Za-z0-9_-]", "-", f"{search_name}-{trial_id}")[-64:]
    tensorboard = job["logging"].setdefault("tensorboard", {})
    tensorboard["name"] = tensorboard.get("name") or f"{search_name}/{trial_id}"
    mlflow = job["logging"].setdefault("mlflow", {})
    mlflow["run_name"] = mlflow.get("run_name") or trial_id
    mlflow["key"] = re.sub(r"[^A-Za-z0-9_./-]", "-", f"{search_name}/{trial_id}")
    job.setdefault("checkpoint", {})["keep"] = max(2, job.get("checkpoint", {}).get("keep", 2))
    return job


def _initial_checkpoint(trial_dir: Path | RunStore, name: str) -> str | None:
    """Tune's checkpoint for this trial (PBT exploit, or resume), copied to trial_dir/name (uploaded, for a trial in
    a bucket); its location, for the Train run to start from."""
    from ray import tune

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    if isinstance(trial_dir, RunStore):
        with tempfile.TemporaryDirectory(prefix="dtrain-init-") as tmp:
            trial_dir.child(name).delete()
            trial_dir.upload(Path(checkpoint.to_directory(str(Path(tmp) / name))), name)
        return str(join(str(trial_dir), name))
    folder = trial_dir / name
    if folder.exists():
        shutil.rmtree(folder)
    checkpoint.to_directory(str(folder))  # the worker applies this trial's optimizer settings to it
    return str(folder)


def _location(where: str | Path) -> Path | RunStore:
    """A search's or trial's folder: local, or in a bucket."""
    return RunStore(str(where)) if is_uri(where) else Path(where)


def _at(folder: Path | RunStore, name: str) -> Path | RunStore:
    return folder.child(name) if isinstance(folder, RunStore) else folder / name


def plan_concurrency(jobs: list[dict], cfg: TuneConfig) -> tuple[int, dict[str, float], str]:
    """(max concurrent trials, one trial's resources, a note) so that every running trial gets all its workers."""
    import ray

    cluster = ray.cluster_resources()
    cpus, gpus = cluster.get("CPU", 0), cluster.get("GPU", 0)
    need_cpu, need_gpu, worst = largest_trial(jobs, cfg)
    if need_cpu > cpus:
        raise ConfigError(f"tune: a trial needs {need_cpu:g} CPUs ({worst}), the cluster has {cpus:g}; lower "
                          "trainer.num_workers, trainer.cpus_per_worker or tune.trial_cpus")
    fits = math.floor(cpus / need_cpu) if need_cpu > 0 else 10**6
    if need_gpu:
        fits = min(fits, math.floor(gpus / need_gpu))
    limit, note = fits, f"{fits} trials fit the cluster at once ({need_cpu:g} CPUs each)"
    if cfg.max_concurrent_trials is not None:
        limit = min(fits, cfg.max_concurrent_trials)
        if cfg.max_concurrent_trials > fits:
            note += f"; tune.max_concurrent_trials {cfg.max_concurrent_trials} lowered to {fits} to avoid a deadlock"
    # A Ray resource request cannot be empty: a driver with no CPU reserves a token 1 MiB of memory instead.
    driver = {"CPU": cfg.trial_cpus} if cfg.trial_cpus > 0 else {"CPU": 0, "memory": 2**20}
    return max(1, min(limit, cfg.num_samples)), driver, note


def largest_trial(jobs: list[dict], cfg: TuneConfig) -> tuple[float, float, str]:
    """(CPUs, GPUs, what makes up its CPUs) of the largest trial any sample can produce: its driver and workers."""
    from dtrain.launch.train import resolve_resources

    need_cpu, need_gpu, worst = 0.0, 0.0, ""
    for job in jobs:
        cfg_job = build_job(OmegaConf.create(job))
        try:
            workers, use_gpu = resolve_resources(cfg_job)
        except ConfigError as err:
            raise ConfigError(f"tune: a trial cannot fit the cluster: {err}") from None
        cpu = cfg.trial_cpus + workers * cfg_job.trainer.cpus_per_worker
        if cpu > need_cpu:
            worst = f"tune.trial_cpus {cfg.trial_cpus:g} + {workers} workers x {cfg_job.trainer.cpus_per_worker:g} CPUs"
        need_cpu, need_gpu = max(need_cpu, cpu), max(need_gpu, workers if use_gpu else 0)
    return need_cpu, need_gpu, worst


def stream_tasks(jobs: list[dict], cfg: TuneConfig, concurrency: int) -> dict[str, Any]:
    """What each Ray Data task of a streamed trial (data.name=parquet) asks for: the CPUs `concurrency` trials of the
    largest size leave free of the cluster (launch.stream.task_resources), so that concurrent trials holding every
    CPU cannot starve their streams' reads (each trial alone would count the others' CPUs as free)."""
    import ray

    from dtrain.launch.stream import task_resources

    cluster_cpus = ray.cluster_resources().get("CPU", 0)
    return task_resources(cluster_cpus - concurrency * largest_trial(jobs, cfg)[0], cluster_cpus)


def prepare(job: DictConfig) -> tuple[TuneConfig, dict[str, Param], dict, list[dict]]:
    """Validate the tune section and the space against the job: (config, params, base job, candidate jobs)."""
    base = to_dict(job)
    cfg, params = read_tune_section(base.get("tune"))
    _absolute_data_path(base)
    return cfg, params, base, check_against_job(base, params, cfg.metric)


def _absolute_data_path(base: dict) -> None:
    # Trials run in Tune's trial directory, so a relative data file would not be found there.
    data = base.get("data") or {}
    for key in ("path", "val_path", "test_path"):
        path = data.get(key)
        if path and not is_uri(path) and not Path(path).is_absolute():
            data[key] = str(Path(path).resolve())


def run_search(job: DictConfig, *, address: str | None = None,
               resume: bool = False) -> tuple[list[dict[str, Any]], TuneConfig]:
    """Run (or with resume, continue) the search job.tune describes; writes results.csv and best.yaml and returns
    the result rows (best first) and the validated tune section."""
    from ray import tune

    from dtrain.launch.train import init_ray, release_unused

    cfg, params, base, jobs = prepare(job)
    search_dir = _claim(job, resume)
    try:
        init_ray(address)
        concurrency, resources, note = plan_concurrency([base, *jobs], cfg)
        # MLflow's parent run of the trials (None when off), continued by a resumed search
        parent = start_search_run(base, (read_text(search_dir, MLFLOW_ID_FILE) or "").strip())
        if parent:
            write_text(search_dir, MLFLOW_ID_FILE, parent + "\n")
    except BaseException:
        if not resume:
            release_unused(search_dir, "trials")
        raise
    if parent:
        base["logging"]["mlflow"]["parent_run_id"] = parent
    print(f"[dtrain] tune: {note}; running up to {concurrency} at once", flush=True)
    setup = {"base": base, "params": params, "metric": cfg.metric, "search_dir": str(search_dir),
             "search_name": job.name, "sys_path": shipped_paths(),
             "stream_tasks": stream_tasks([base, *jobs], cfg, concurrency) if job.data.name == "parquet" else None}
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)
    # Tune keeps its state and the trials' checkpoints in the search folder, through the bucket's filesystem if any
    if isinstance(search_dir, RunStore):
        where, storage = search_dir.path, {"storage_filesystem": search_dir.fs}
    else:
        where, storage = str(search_dir), {}
    if resume:
        if not tune.Tuner.can_restore(where, **storage):
            raise ConfigError(f"{search_dir}: no Tune state to resume from (the search never started)")
        tuner = tune.Tuner.restore(where, trainable, resume_unfinished=True, resume_errored=True, **storage)
    else:
        tuner = tune.Tuner(
            trainable, param_space={key: p.domain(grid=cfg.search_alg == "grid") for key, p in params.items()},
            tune_config=tune.TuneConfig(
                metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples,
                max_concurrent_trials=None if cfg.search_alg in ("random", "grid") or cfg.budget else concurrency,
                scheduler=_scheduler(cfg, params, job), search_alg=_budgeted(_search_alg(cfg, concurrency), cfg,
                                                                             concurrency),
                time_budget_s=cfg.time_budget_s, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(name=job.name, storage_path=posixpath.dirname(where), verbose=1, **storage,
                                      stop=_budget_stopper(cfg),
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=_keep(cfg))),
        )
    try:
        with tune_interruption() as stopped, warnings.catch_warnings():
            # Tune's advice for every PBT search; dtrain's trials are functions, whose actors Tune cannot reuse
            warnings.filterwarnings("ignore", message="Consider boosting PBT performance", category=UserWarning)
            grid = tuner.fit()
    finally:
        end_search_run(base, parent, failed=sys.exc_info()[0] is not None)
    rows = result_rows(grid, cfg, params, search_dir)
    if rows and all(r["status"] == "error" for r in rows):
        raise _first_error(grid)
    rows = with_costs(rows, search_dir, base.get("cost"))
    write_outputs(rows, to_dict(job), cfg, params, search_dir)
    if stopped.is_set() or grid.num_terminated + grid.num_errors < len(grid):  # Ctrl-C/SIGTERM: Tune saved its
        # state, stopped the running trials and returned
        print(f"[dtrain] tune: search interrupted ({grid.num_terminated} of {len(grid)} trials finished); "
              f"continue it with: dtrain tune {search_dir} --resume", flush=True)
        raise KeyboardInterrupt
    return rows, cfg


def _claim(job: DictConfig, resume: bool) -> Path | RunStore:
    """The search's folder (local, or in a bucket after a probe write there), claimed for a new search: its job file
    is written at once, so two searches started with one name cannot share it."""
    from dtrain.launch.train import usable_folder

    if is_uri(job.runs_dir):
        search_dir: Path | RunStore = probe(str(job.runs_dir)).child(job.name)
        exists = search_dir.exists(JOB_FILE)
    else:
        search_dir = usable_folder(Path(job.runs_dir).expanduser(), "runs_dir") / job.name
        try:
            search_dir.mkdir(exist_ok=resume)
            exists = False
        except FileExistsError:
            exists = True
    if exists and not resume:
        raise ConfigError(f"name: search directory {search_dir} already exists; pass --resume to continue it "
                          "or choose another name=")
    if not resume:
        write_text(search_dir, JOB_FILE, OmegaConf.to_yaml(job))
    return search_dir


def _budgeted(search_alg: Any, cfg: TuneConfig, concurrency: int) -> Any:
    """search_alg behind tune.budget's gate (a Searcher first capped at the concurrency, as Tune would do)."""
    if cfg.budget is None:
        return search_alg
    from ray.tune.search import ConcurrencyLimiter, Searcher, SearchGenerator

    from dtrain.launch.budget import BudgetGate

    if isinstance(search_alg, Searcher):
        search_alg = SearchGenerator(ConcurrencyLimiter(search_alg, max_concurrent=concurrency))
    return BudgetGate(search_alg, cfg.budget)


def _budget_stopper(cfg: TuneConfig) -> Any:
    from dtrain.launch.budget import BudgetStopper

    return BudgetStopper(cfg.budget) if cfg.budget is not None else None


def _keep(cfg: TuneConfig) -> int | None:
    if cfg.keep_checkpoints is not None:
        return cfg.keep_checkpoints
    # A PBT exploit restores the checkpoint the better trial had when it was chosen; that trial keeps training
    # meanwhile, so a count-based cleanup could delete the checkpoint before the restore reads it.
    return None if cfg.scheduler == "pbt" else 2


def _trial_dirname(trial: Any) -> str:
    return trial.trial_id


def _scheduler(cfg: TuneConfig, params: dict[str, Param], job: DictConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if cfg.scheduler == "asha":
        max_t = max(job.trainer.max_epochs, cfg.grace_period)
        # A trial that reaches max_t ends by itself (its run evaluates the test split and writes its summary after
        # the last epoch's report); stopping it there would abort that.
        return ASHAScheduler(time_attr="training_iteration", max_t=max_t, grace_period=cfg.grace_period,
                             reduction_factor=cfg.reduction_factor, stop_last_trials=False)
    if cfg.scheduler == "pbt":
        every = job.checkpoint.every_n_epochs
        if every < 1 or cfg.perturbation_interval % every:
            raise ConfigError(f"tune.perturbation_interval: expected a multiple of checkpoint.every_n_epochs "
                              f"({every}; pbt needs epoch checkpoints), got {cfg.perturbation_interval}")
        return PopulationBasedTraining(time_attr="training_iteration", perturbation_interval=cfg.perturbation_interval,
                                       hyperparam_mutations={k: p.domain() for k, p in params.items()},
                                       quantile_fraction=cfg.quantile_fraction, synch=cfg.synch)
    return FIFOScheduler()


def _search_alg(cfg: TuneConfig, concurrency: int) -> Any:
    """The search algorithm; Tune caps optuna/hyperopt through max_concurrent_trials, random/grid cap themselves."""
    if cfg.search_alg == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=cfg.seed)
    if cfg.search_alg == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(random_state_seed=cfg.seed, n_initial_points=max(1, min(20, cfg.num_samples // 2)))
    from ray.tune.search import BasicVariantGenerator

    # Random sampling; grid([...]) values expand to every combination.
    return BasicVariantGenerator(max_concurrent=concurrency, random_state=cfg.seed)


def _first_error(grid: Any) -> DtrainError:
    from dtrain.launch.train import find_user_error

    errors = [r.error for r in grid if r.error is not None]
    user = next((u for u in map(find_user_error, errors) if u is not None), None)
    if user is not None:
        return user
    first = str(errors[0]).strip().splitlines()[-1] if errors else "unknown"
    return DtrainError(f"tune: every trial failed; the first error: {first}")


def result_rows(grid: Any, cfg: TuneConfig, params: dict[str, Param],
                search_dir: Path | RunStore) -> list[dict[str, Any]]:
    """One row per trial: id, status, epochs reported, best and last metric, sampled values, run dir; best first,
    ties in trial order."""
    rows = []
    for result in grid:
        trial = posixpath.basename(str(result.path).rstrip("/"))
        frame = result.metrics_dataframe
        history = frame[cfg.metric].dropna().tolist() if frame is not None and cfg.metric in frame else []
        pick = max if cfg.mode == "max" else min
        runs = _runs(_at(_at(search_dir, "trials"), trial))
        status = "error" if result.error else "ok" if result.config is not None else "pending"
        rows.append({"trial": trial, "status": status, "epochs": len(history),
                     cfg.metric: pick(history) if history else math.nan,
                     f"last {cfg.metric}": history[-1] if history else math.nan,
                     **_test_metrics(runs[-1] if runs else None),
                     **{key: p.decode((result.config or {}).get(key)) for key, p in params.items()},
                     "run_dir": str(runs[-1]) if runs else ""})
    tested = sorted({k for row in rows for k in row if k.startswith("test")})
    rows = [{**{k: v for k, v in row.items() if k != "run_dir"}, **{k: row.get(k, math.nan) for k in tested},
             "run_dir": row["run_dir"]} for row in rows]
    sign = -1 if cfg.mode == "max" else 1
    return sorted(rows, key=lambda r: (math.isnan(r[cfg.metric]), sign * r[cfg.metric]  # ties: trial order, so a
                                       if not math.isnan(r[cfg.metric]) else 0, r["trial"]))  # resume keeps it


def _runs(trial_dir: Path | RunStore) -> list[Path | RunStore]:
    """A trial's Train runs (one per segment: run0, run1, ... after PBT exploits and resumes), in order."""
    return sorted(subfolders(trial_dir, "run"), key=lambda p: int(posixpath.basename(str(p))[3:] or 0))


def _test_metrics(run_dir: Path | RunStore | None) -> dict[str, Any]:
    """A finished trial's test metrics (of the weights its run reports, see summary.json's evaluated) and the epoch
    those weights are from; nothing for a trial the scheduler stopped (its run never reached the test split)."""
    try:
        summary = json.loads(read_text(run_dir, SUMMARY_FILE) or "{}") if run_dir is not None else {}
    except (OSError, ValueError):
        return {}
    evaluated = summary.get("evaluated", {})
    return {**summary.get("test", {}), **({"test epoch": evaluated["epoch"]} if "epoch" in evaluated else {})}


def with_costs(rows: list[dict[str, Any]], search_dir: Path | RunStore,
               rates: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Each row with its trial's GPU-hours, CPU-hours (and cost, when priced) over all its segments, before
    run_dir; the search's total goes to COST_FILE and the console."""
    from dtrain.launch.cost import describe, run_cost, sum_costs

    out, costs = [], []
    for row in rows:
        trial_cost = sum_costs([run_cost(p, rates) for p in _runs(_at(_at(search_dir, "trials"), row["trial"]))])
        costs.append(trial_cost)
        extra = {k: trial_cost.get(k, 0.0) for k in ("gpu_hours", "cpu_hours", "cost") if k != "cost" or
                 "cost" in trial_cost}
        out.append({k: v for k, v in row.items() if k != "run_dir"} | extra | {"run_dir": row["run_dir"]})
    total = sum_costs(costs)
    write_text(search_dir, COST_FILE, json.dumps(total, indent=2) + "\n")
    print(f"[dtrain] tune: total over {len(rows)} trials: {describe(total)}", flush=True)
    return out


def write_outputs(rows: list[dict[str, Any]], job: dict, cfg: TuneConfig, params: dict[str, Param],
                  search_dir: Path | RunStore) -> None:
    """results.csv (every trial, best first) and best.yaml (the job with the best values, ready for dtrain train)."""
    import csv
    import io

    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(rows[0]) if rows else ["trial"])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in row.items()})
    write_text(search_dir, RESULTS_FILE, table.getvalue())
    ok = [r for r in rows if r["status"] == "ok" and not math.isnan(r[cfg.metric])]
    if not ok:
        return
    best = ok[0]
    spec = apply_params(job, params, {k: best[k] for k in params})
    spec.pop("tune", None)
    spec["name"] = None  # `dtrain train best.yaml` names the run itself
    header = (f"# Best of search {job['name']}: trial {best['trial']}, {cfg.metric} = {best[cfg.metric]:.6g} "
              f"({cfg.mode}).\n# Run it with: dtrain train {join(str(search_dir), BEST_FILE)}\n")
    write_text(search_dir, BEST_FILE, header + OmegaConf.to_yaml(OmegaConf.create(spec)))


def print_table(rows: list[dict[str, Any]], metric: str) -> None:
    """The results table on the console, best first."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"dtrain tune: {len(rows)} trials, best {metric} first")
    columns = [c for c in (rows[0] if rows else {}) if c != "run_dir"]
    for column in columns:
        table.add_column(column, justify="right" if column in ("epochs", metric, f"last {metric}") else "left")
    for row in rows:
        table.add_row(*(f"{row[c]:.4g}" if isinstance(row[c], float) else json.dumps(row[c])
                        if isinstance(row[c], list) else str(row[c]) for c in columns))
    Console(width=160).print(table)
