"""The training loop every model and strategy goes through: stages -> epochs -> micro-batches -> optimizer steps.

It knows no strategy, tracker or launcher by name: it is handed a model, its loaders, a strategy, a LoopConfig and a
RunContext with two callables to the outside (log: rank 0's metrics; publish: metrics and checkpoints to the
launcher).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dtrain.data.base import Batch, DataBundle, EvalLoader, Loader, Loaders
from dtrain.engine import dist
from dtrain.engine.callbacks import Callback
from dtrain.engine.checkpoint import safe_load, set_rng_state
from dtrain.engine.metrics import MetricSums, NonFiniteGuard, PhaseClock
from dtrain.engine.saving import STATE_FILE, Assemble, CheckpointWriter
from dtrain.engine.state import TrainState
from dtrain.engine.stop import TRAINING
from dtrain.engine.strategies import Strategy
from dtrain.errors import ConfigError, Preempted, TrainingError, check
from dtrain.models import step_metrics
from dtrain.models.base import CatalogModel

Publish = Callable[[dict[str, Any], Path | None], None]
"""Called by every rank at each epoch end and checkpoint with the metrics and this rank's checkpoint folder, at the
same step on every rank, once every rank's write of that checkpoint is done; the folder then belongs to the publisher
(it removes it once it has moved or copied it)."""


@dataclass
class EarlyStoppingConfig:
    monitor: str | None = None
    """Metric to watch, e.g. val/loss or val/acc: one the run logs (train/<m> and val/<m> for each metric m of the
    model's step); null disables early stopping."""
    mode: str = "min"
    """min or max: which direction is better."""
    patience: int = 5
    """Epochs without improvement before stopping."""
    min_delta: float = 0.0
    """Smallest change that counts as an improvement."""

    def __post_init__(self) -> None:
        check(self.mode in ("min", "max"), "trainer.early_stopping.mode", "min or max", self.mode)
        check(self.patience >= 1, "trainer.early_stopping.patience", "an integer >= 1", self.patience)
        check(self.min_delta >= 0, "trainer.early_stopping.min_delta", "a number >= 0", self.min_delta)


@dataclass
class LoopConfig:
    """What the loop needs to know of the job (the launcher fills it in from the trainer and checkpoint sections)."""

    lr: float
    max_epochs: int
    max_steps: int | None = None
    log_every_n_steps: int = 10
    max_nonfinite_steps: int = 5
    checkpoint_every_n_epochs: int = 1
    checkpoint_every_n_steps: int = 0
    checkpoint_background: bool = True
    collective_timeout_s: float = 600.0
    """How long a collective waits for its peers (set on the process group by the launcher; named in errors)."""
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)


@dataclass
class RunContext:
    """What the launcher hands the loop: who we are, where results go, what to resume from."""

    rank: int
    world: int
    publish: Publish
    log: Callable[[dict[str, Any]], None]
    """Rank 0's metrics sink (metrics.jsonl, progress, trackers); a no-op on other ranks."""
    resume_dir: Path | None = None
    retarget: bool = False
    """resume_dir is another run's checkpoint (dtrain tune's PBT exploit): keep its weights and optimizer state,
    apply this run's optimizer settings."""
    callbacks: list[Callback] = field(default_factory=list)
    export: Callable[[dict[str, torch.Tensor]], None] | None = None
    """Called by every rank at the end with the full float32 weights the test metrics were computed with (rank 0's
    launcher writes them to the run folder); None: nothing is gathered."""
    probe: Callable[[dict[str, torch.Tensor]], dict[str, float]] | None = None
    """Called by rank 0 at the end with those weights (export must be set); returns more test metrics (the
    launcher's linear probe)."""
    staging: Path | None = None
    """Where checkpoints are written before they are published: on the run folder's filesystem publishing is a
    rename (the local launcher); None: the system's temp folder."""
    assemble: Assemble | None = None
    """What the writer thread does with each checkpoint folder once written (the local launcher moves its files to
    where the ranks' files are put together); None: publish gets the folder as written."""
    publish_in_writer: bool = False
    """publish is a barrier of the ranks itself (Ray Train's report) and metrics alone are not published through
    it: each checkpoint is then published by the writer thread as soon as this rank's write is done, and the
    training thread never waits for the other ranks' writes (see saving.CheckpointWriter)."""


def fit(model: CatalogModel, loaders: Loaders, strategy: Strategy, cfg: LoopConfig,
        ctx: RunContext) -> dict[str, Any]:
    """Train model on loaders.train as cfg says; returns the summary (final and best metrics, throughput)."""
    model.all_reduce_sum = dist.all_reduce_sum  # the models' one collective (the SOM's batch update)
    writer = CheckpointWriter(ctx.rank, ctx.world, ctx.publish, background=cfg.checkpoint_background,
                              staging=ctx.staging, assemble=ctx.assemble, publish_in_writer=ctx.publish_in_writer)
    state = TrainState(**safe_load(ctx.resume_dir / STATE_FILE)) if ctx.resume_dir else TrainState()
    TRAINING.set()
    try:
        return _fit(model, loaders, strategy, cfg, ctx, writer, state)
    except Preempted:
        raise  # its checkpoint is published
    except BaseException as err:
        writer.close()
        if ctx.world > 1 and dist.is_collective_timeout(err):
            raise _hang(state, ctx, cfg) from err
        raise
    finally:
        writer.shutdown()
        TRAINING.clear()


def _hang(state: TrainState, ctx: RunContext, cfg: LoopConfig) -> TrainingError:
    """The one line for a collective that timed out: the step, and the ranks that did not arrive if known."""
    absent = dist.absent_ranks(f"hang/{state.step}")
    who = ("a peer did not arrive" if absent is None else "every rank arrived late" if not absent
           else f"rank {', '.join(map(str, absent))} did not arrive")
    message = (f"trainer.collective_timeout_s: a collective after step {state.step} did not complete within "
               f"{cfg.collective_timeout_s:g} s on rank {ctx.rank}: {who} (stopped, hung, or its node is gone)")
    ctx.log({"event": "hang", "step": state.step, "absent_ranks": absent, "message": message})
    return TrainingError(message)


def _fit(model: CatalogModel, loaders: Loaders, strategy: Strategy, cfg: LoopConfig, ctx: RunContext,
         writer: CheckpointWriter, state: TrainState) -> dict[str, Any]:
    started = time.perf_counter()
    stages, train = model.stages(), loaders.train
    _keep_global_batch(state, train.plan.global_batch, ctx.retarget)
    guard = NonFiniteGuard(state, cfg.max_nonfinite_steps, min(cfg.log_every_n_steps, 1024))
    steps_per_epoch = train.steps_per_epoch()
    best_weights: dict[str, torch.Tensor] | None = None  # the monitored best epoch's, in the final stage
    vote = dist.StepVote(cfg.collective_timeout_s)
    while state.stage < len(stages) and not state.stopped:
        stage = stages[state.stage]
        model.set_stage(stage)
        epochs = stage.max_epochs or cfg.max_epochs
        wrapped = strategy.setup(model, stage.lr or cfg.lr, epochs * steps_per_epoch, steps_per_epoch)
        for callback in ctx.callbacks:
            callback.on_setup(strategy, model, ctx.rank)
        if ctx.resume_dir is not None:
            _resume(strategy, state, ctx, stage.lr or cfg.lr)
        done_in_stage = state.epoch * steps_per_epoch + state.epoch_samples // train.plan.global_batch
        ctx.log({"event": "stage", "stage": stage.name, "first_step": state.step - done_in_stage, "epochs": epochs,
                 "steps_per_epoch": steps_per_epoch, "global_batch": train.plan.global_batch, "workers": ctx.world})
        while state.epoch < epochs and not state.stopped:
            train.set_epoch(state.stage * 10_000 + state.epoch)
            train_metrics = _train_epoch(cfg, wrapped, train, strategy, state, ctx, guard, writer, vote)
            val_metrics = evaluate(wrapped, loaders.val, strategy, "val")
            state.epoch, state.epoch_samples, state.epochs_done = state.epoch + 1, 0, state.epochs_done + 1
            metrics = {"stage": stage.name, "epoch": state.epoch, "step": state.step, **train_metrics, **val_metrics}
            improved = _early_stopping(cfg.early_stopping, state, metrics, final=state.stage == len(stages) - 1)
            if improved and cfg.early_stopping.monitor is not None and state.stage == len(stages) - 1:
                best_weights = {k: v.clone() for k, v in strategy.full_state_dict().items()}
            ctx.log({"event": "epoch", **metrics})
            every = cfg.checkpoint_every_n_epochs
            if every > 0 and state.epoch % every == 0 or state.stopped:
                writer.start(strategy, state, metrics)
            else:
                writer.finish()  # a mid-epoch checkpoint first: what is published stays in order
                ctx.publish(metrics, None)
            for callback in ctx.callbacks:
                callback.on_epoch_end(state, ctx.rank)
            if cfg.max_steps and state.step >= cfg.max_steps:
                state.stopped, state.stop_reason = True, f"max_steps={cfg.max_steps} reached"
        if state.stopped and "early stopping" in state.stop_reason and state.stage < len(stages) - 1:
            state.stopped = False  # early stopping ends a pre-training stage, not the run
        if not state.stopped:
            state.stage, state.epoch = state.stage + 1, 0
    writer.finish()
    vote.close()
    evaluated = _use_best_weights(cfg.early_stopping, state, strategy, best_weights, len(stages) - 1)
    test_metrics = evaluate(wrapped, loaders.test, strategy, "test")
    if ctx.export is not None:
        weights = best_weights if evaluated["weights"] == "best" else strategy.full_state_dict()
        ctx.export(weights)
        if ctx.probe is not None and ctx.rank == 0:
            test_metrics = {**test_metrics, **ctx.probe(weights)}
    wall = time.perf_counter() - started
    summary = {"final": {**state.history.get("last", {}), **test_metrics}, "best": state.history.get("best", {}),
               "test": test_metrics, "evaluated": evaluated, "epochs": state.epochs_done, "steps": state.step,
               "stages": len(stages),
               "skipped_steps": state.skipped_steps, "stop_reason": state.stop_reason or "completed",
               "wall_time_s": wall, "train_samples_per_s": state.samples / max(wall, 1e-9), "world_size": ctx.world}
    ctx.log({"event": "end", **summary})
    return summary


def _train_epoch(cfg: LoopConfig, wrapped: nn.Module, loader: Loader, strategy: Strategy, state: TrainState,
                 ctx: RunContext, guard: NonFiniteGuard, writer: CheckpointWriter,
                 vote: dist.StepVote) -> dict[str, float]:
    sums, steps_per_epoch = MetricSums(), loader.steps_per_epoch()
    window_loss, out = None, None
    log_started, log_steps, log_samples = time.perf_counter(), 0, 0  # since the last logged step
    clock = PhaseClock()
    before_epoch = state.step - state.epoch_samples // loader.plan.global_batch  # steps done before this epoch
    wrapped.train()
    for batch in loader.iter_from(state.epoch_samples):
        clock.lap("data")
        with strategy.no_sync(not batch.last), strategy.autocast():
            out = wrapped(batch.tensors)
        # Weight by this rank's share of the step's samples: the averaged gradient is then exactly the mean over
        # the global batch, whatever the number of ranks and micro-batches.
        weight = batch.real * ctx.world / batch.step_samples
        strategy.backward(out.loss if weight == 1 else out.loss * weight)
        window_loss = out.loss.detach() if window_loss is None else window_loss + out.loss.detach()
        sums.add(out.metrics, batch.real)
        clock.lap("forward_backward")
        if not batch.last:
            continue
        result = strategy.step(window_loss)
        clock.lap("optimizer")
        guard.add(result.skipped)
        window_loss = None
        state.step += 1
        state.samples += batch.step_samples
        state.epoch_samples += batch.step_samples
        log_steps, log_samples = log_steps + 1, log_samples + batch.step_samples
        if state.step % cfg.log_every_n_steps == 0:
            guard.check()  # reads the device back: the clock below covers the device's work, not just the host's
            per_rank = {k: v for callback in ctx.callbacks for k, v in callback.log_values().items()}
            logged = dist.mean_across_ranks({f"train/{k}": v for k, v in out.metrics.items()}
                                            | {"train/grad_norm": result.grad_norm} | clock.read(log_steps),
                                            per_rank)
            elapsed = max(time.perf_counter() - log_started, 1e-9)
            ctx.log({"event": "step", "step": state.step,
                     "epoch": state.epoch + (state.step - before_epoch) / steps_per_epoch, "lr": strategy.lr(),
                     "samples_per_s": log_samples / elapsed, "step_time_s": elapsed / log_steps, **logged})
            log_started, log_steps, log_samples = time.perf_counter(), 0, 0
        every = cfg.checkpoint_every_n_steps
        if every and state.step % every == 0 and state.step - before_epoch < steps_per_epoch:  # not the epoch's last
            guard.check()
            writer.start(strategy, state, {"epoch": state.epoch, "step": state.step})
        for callback in ctx.callbacks:
            callback.on_step_end(state, ctx.rank)
        vote.agree(state.step, writer.writing())
        if vote.stop:
            _checkpoint_and_hand_over(strategy, state, ctx, guard, writer)
        writer.publish_if_due(vote.as_of, vote.writing)
        clock.lap("other")
        if cfg.max_steps and state.step >= cfg.max_steps:
            break
    guard.check()
    return sums.reduce("train")


@torch.no_grad()
def evaluate(wrapped: nn.Module, loader: EvalLoader, strategy: Strategy, prefix: str) -> dict[str, float]:
    """Sample-weighted mean of the model's metrics over a split, sharded across ranks (no sample counted twice)."""
    if len(loader) == 0:
        return {}
    wrapped.eval()
    sums = MetricSums()
    batch: Batch
    for batch in loader:
        with strategy.autocast():
            out = wrapped(batch.tensors)
        sums.add(out.metrics, batch.real)
    wrapped.train()
    return sums.reduce(prefix)


def check_watched_metrics(model_cfg: Any, data: DataBundle, monitor: str | None, tune_metric: str | None = None
                          ) -> None:
    """Before the workers start: early stopping's monitor and dtrain tune's metric must be among the metrics each
    epoch's record carries, the epoch means of every metric of the model's step (step_metrics, from one step on two
    samples) over training (train/<m>) and, if there is one, over the validation split (val/<m>)."""
    names = step_metrics(model_cfg, data.meta, tuple(t[:2] for t in data.train))
    splits = ("train", "val") if len(data.val[0]) > 0 else ("train",)
    logged = [f"{split}/{name}" for split in splits for name in names]
    check_watched("trainer.early_stopping.monitor", monitor, logged)
    check_watched("tune.metric", tune_metric, logged)


def check_watched(key: str, metric: str | None, logged: list[str]) -> None:
    """A metric that setting `key` watches (early stopping's monitor, dtrain tune's metric) must be one the run
    logs: a name that matches none would otherwise never stop or rank anything, silently."""
    if metric is not None and metric not in logged:
        raise ConfigError(f"{key}: expected a metric this run logs ({', '.join(logged)}), got {metric!r}")


def _early_stopping(es: EarlyStoppingConfig, state: TrainState, metrics: dict[str, Any], final: bool) -> bool:
    """Track the best epoch (and stop after patience epochs without improvement); True if this epoch is the best.
    final: the last stage, whose epochs must log the monitored metric (a pre-training stage may log others)."""
    state.history["last"] = metrics
    if final:  # the driver checks this before the workers start, where it can read the data (not when streamed)
        check_watched("trainer.early_stopping.monitor", es.monitor,
                      [k for k in metrics if k.startswith(("val/", "train/"))])
    key = es.monitor or next((k for k in ("val/loss", "train/loss") if k in metrics), None)
    if key is None or key not in metrics:
        return False
    value, sign = metrics[key], (1 if es.mode == "max" else -1)
    if state.best is None or sign * (value - state.best) > es.min_delta:
        state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
        state.history["best"] = {**metrics, "monitor": key}
        return True
    if es.monitor is not None:
        state.bad_epochs += 1
        if state.bad_epochs >= es.patience:
            state.stopped = True
            state.stop_reason = f"early stopping: {key} did not improve for {es.patience} epochs"
    return False


def _use_best_weights(es: EarlyStoppingConfig, state: TrainState, strategy: Strategy,
                      best_weights: dict[str, torch.Tensor] | None, final_stage: int) -> dict[str, Any]:
    """With a monitored metric, put the best epoch's weights back for the test split (after the last checkpoint was
    written, so resuming is unaffected); say which weights the test metrics are of."""
    last, best = state.history.get("last", {}), state.history.get("best", {})
    where = {"epoch": last.get("epoch"), "step": last.get("step")}
    if es.monitor is None:
        return {"weights": "last", **where}
    if best.get("step") == last.get("step"):
        return {"weights": "best", "monitor": es.monitor, es.monitor: best.get(es.monitor), **where}
    if best_weights is None:  # the best epoch was trained before a resume, or in an earlier stage
        return {"weights": "last", **where, "why": "the best epoch's weights were not kept (trained before a resume)"}
    if not strategy.load_full_state_dict(best_weights):
        return {"weights": "last", **where, "why": "this strategy cannot put weights back (ZeRO-3)"}
    return {"weights": "best", "monitor": es.monitor, es.monitor: best.get(es.monitor), "epoch": best.get("epoch"),
            "step": best.get("step")}


def _checkpoint_and_hand_over(strategy: Strategy, state: TrainState, ctx: RunContext, guard: NonFiniteGuard,
                              writer: CheckpointWriter) -> None:
    """A rank was asked to stop: every rank checkpoints this step, waits for it to be published and raises
    Preempted (the launcher restarts the run from it, losing no step)."""
    guard.check()
    writer.start(strategy, state, {"epoch": state.epoch, "step": state.step})
    writer.finish()
    ctx.log({"event": "preempted", "step": state.step, "samples": state.samples})
    raise Preempted(f"training stopped at step {state.step}: a worker was asked to stop (SIGTERM, or its node's "
                    "preemption notice); its checkpoint is written, and the run resumes from it (trainer.max_failures, "
                    "or --resume)")


def _keep_global_batch(state: TrainState, global_batch: int, retarget: bool) -> None:
    """A resumed run trains on with the global batch it was trained with (the position is in its steps)."""
    if state.global_batch and state.global_batch != global_batch and not retarget:
        raise ConfigError(f"data.global_batch_size: the checkpoint was trained with {state.global_batch} samples per "
                          f"step, this run would take {global_batch}; set data.global_batch_size={state.global_batch}"
                          " to resume at another worker count")
    state.global_batch = global_batch


def _resume(strategy: Strategy, state: TrainState, ctx: RunContext, lr: float) -> None:
    try:
        strategy.load(ctx.resume_dir)
    except RuntimeError as err:  # torch's load_state_dict: a checkpoint of another model (its config.yaml edited)
        if "Error(s) in loading state_dict" not in str(err):
            raise
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), "")
        raise ConfigError(f"{ctx.resume_dir}: the checkpoint does not fit this job's model ({detail}); resume it "
                          "with the model it was trained with") from None
    if ctx.retarget:
        strategy.retarget(lr)
    rng_file = ctx.resume_dir / f"rng_rank{ctx.rank}.pt"
    if rng_file.exists():
        set_rng_state(safe_load(rng_file))
    ctx.log({"event": "resume", "stage": state.stage, "epoch": state.epoch, "epoch_samples": state.epoch_samples,
             "step": state.step, "samples": state.samples})
    ctx.resume_dir = None
