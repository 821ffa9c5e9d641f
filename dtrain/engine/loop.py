"""The training loop every model and strategy goes through: stages -> epochs -> micro-batches -> optimizer steps."""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dtrain.data.base import DataBundle
from dtrain.data.sharding import ShardedLoader
from dtrain.engine import dist
from dtrain.engine.checkpoint import atomic_save, rng_state, safe_load, set_rng_state, write_manifest
from dtrain.engine.faults import maybe_kill
from dtrain.engine.strategy import Strategy
from dtrain.errors import TrainingError
from dtrain.models.base import CatalogModel

STATE_FILE = "train_state.pt"
Report = Callable[[dict[str, Any], Path | None], None]
"""Called by every rank at each epoch end / checkpoint with the epoch metrics and this rank's checkpoint folder."""


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint so a resumed run continues exactly."""

    stage: int = 0
    epoch: int = 0
    batch: int = 0
    """Micro-batches of the current epoch already done (for mid-epoch resume)."""
    step: int = 0
    samples: int = 0
    skipped_steps: int = 0
    epochs_done: int = 0
    """Epochs completed over all stages."""
    best: float | None = None
    best_epoch: int = -1
    bad_epochs: int = 0
    stopped: bool = False
    stop_reason: str = ""
    history: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunContext:
    """What the launcher hands the loop: who we are, where to report, what to log to, what to resume from."""

    rank: int
    world: int
    report: Report
    log: Callable[[dict[str, Any]], None]
    """Rank 0's metrics sink (metrics.jsonl, progress, W&B); a no-op on other ranks."""
    resume_dir: Path | None = None


def fit(job: Any, model: CatalogModel, data: DataBundle, strategy: Strategy, ctx: RunContext) -> dict[str, Any]:
    """Train model on data as job says; returns the summary (final and best metrics, throughput)."""
    t, dev = job.trainer, strategy.device
    data = dataclasses.replace(data, train=_to(data.train, dev), val=_to(data.val, dev), test=_to(data.test, dev))
    batch_size = _batch_size(job, len(data.train[0]), ctx.world)
    if hasattr(strategy, "micro_batch_size"):
        strategy.micro_batch_size = batch_size  # DeepSpeed's config states the per-rank micro-batch
    train = ShardedLoader(data.train, batch_size, ctx.rank, ctx.world, shuffle=True, seed=t.seed)
    started = time.perf_counter()
    state = TrainState(**safe_load(ctx.resume_dir / STATE_FILE)) if ctx.resume_dir else TrainState()
    stages = model.stages()
    guard = NonFiniteGuard(state, t.max_nonfinite_steps, min(t.log_every_n_steps, 1024))
    while state.stage < len(stages) and not state.stopped:
        stage = stages[state.stage]
        model.set_stage(stage)
        epochs = stage.max_epochs or t.max_epochs
        steps_per_epoch = math.ceil(len(train) / t.grad_accum)
        wrapped = strategy.setup(model, stage.lr or job.optim.lr, epochs * steps_per_epoch, steps_per_epoch)
        if ctx.resume_dir is not None:
            _resume(strategy, state, ctx)
            ctx.resume_dir = None
        done_in_stage = state.epoch * steps_per_epoch + state.batch // t.grad_accum  # > 0 when resumed mid-stage
        ctx.log({"event": "stage", "stage": stage.name, "first_step": state.step - done_in_stage, "epochs": epochs,
                 "steps_per_epoch": steps_per_epoch, "global_batch": batch_size * ctx.world * t.grad_accum})
        while state.epoch < epochs and not state.stopped:
            train.set_epoch(state.stage * 10_000 + state.epoch)
            train_metrics = _train_epoch(job, wrapped, train, strategy, state, ctx, guard)
            val_metrics = evaluate(wrapped, data.val, batch_size, strategy, ctx, "val")
            state.epoch, state.batch, state.epochs_done = state.epoch + 1, 0, state.epochs_done + 1
            metrics = {"stage": stage.name, "epoch": state.epoch, "step": state.step, **train_metrics, **val_metrics}
            _early_stopping(job, state, metrics)
            ctx.log({"event": "epoch", **metrics})
            every = job.checkpoint.every_n_epochs
            _report(strategy, state, ctx, metrics, save=every > 0 and state.epoch % every == 0 or state.stopped)
            if job.trainer.max_steps and state.step >= job.trainer.max_steps:
                state.stopped, state.stop_reason = True, f"max_steps={job.trainer.max_steps} reached"
        if state.stopped and "early stopping" in state.stop_reason and state.stage < len(stages) - 1:
            state.stopped = False  # early stopping ends a pre-training stage, not the run
        if not state.stopped:
            state.stage, state.epoch = state.stage + 1, 0
    test_metrics = evaluate(wrapped, data.test, batch_size, strategy, ctx, "test")
    wall = time.perf_counter() - started
    summary = {"final": {**state.history.get("last", {}), **test_metrics}, "best": state.history.get("best", {}),
               "test": test_metrics, "epochs": state.epochs_done, "steps": state.step, "stages": len(stages),
               "skipped_steps": state.skipped_steps, "stop_reason": state.stop_reason or "completed",
               "wall_time_s": wall, "train_samples_per_s": state.samples / max(wall, 1e-9), "world_size": ctx.world}
    ctx.log({"event": "end", **summary})
    return summary


class NonFiniteGuard:
    """Counts skipped (non-finite) steps and stops the run after `limit` of them in a row.

    The loop hands it each step's flag, a tensor on the device; the host reads the flags only in check(), which the
    loop calls where it reads metrics back anyway (log steps, checkpoints, epoch ends): a training step never waits
    for the device, and keeping a flag launches nothing. Skipped steps leave the weights untouched, so a run of
    them noticed a few steps late costs nothing but those steps.
    """

    def __init__(self, state: TrainState, limit: int, capacity: int) -> None:
        self.state, self.limit, self.capacity = state, limit, capacity
        self.flags: list[Tensor] = []

    def add(self, skipped: Tensor) -> None:
        if len(self.flags) == self.capacity:  # more steps than logging windows hold: read back now and then anyway
            self.check()
        self.flags.append(skipped)

    def check(self) -> None:
        """Account for the steps added since the last check (the newest is state.step)."""
        if not self.flags:
            return
        state, flags, self.flags = self.state, torch.stack(self.flags).tolist(), []
        run = state.history.get("nonfinite_run", 0)
        for step, skipped in enumerate(flags, start=state.step - len(flags) + 1):
            run = run + 1 if skipped else 0
            state.skipped_steps += bool(skipped)
            if run >= self.limit:
                raise TrainingError(f"training stopped: {self.limit} consecutive steps had a non-finite loss or "
                                    f"gradient (step {step}); lower optim.lr or set trainer.grad_clip")
        state.history["nonfinite_run"] = run


class MetricSums:
    """Sample-weighted sums of a model's metrics, kept on the device.

    add() only keeps a batch's metric tensors (no device work per batch); every `capacity` batches, and when read,
    the kept ones are summed with one stack, one sum and one add per distinct batch weight (usually one: only an
    epoch's last batch may be smaller).
    """

    def __init__(self, capacity: int = 256) -> None:
        self.keys: list[str] = []
        self.totals: Tensor | None = None
        self.n, self.capacity, self.kept = 0, capacity, 0
        self.pending: dict[int, list[Tensor]] = {}

    def add(self, metrics: dict[str, Tensor], weight: int) -> None:
        if not self.keys:
            self.keys = list(metrics)
        # Detached: a kept tensor must not hold its batch's autograd graph.
        self.pending.setdefault(weight, []).extend(v.detach() if v.requires_grad else v for v in metrics.values())
        self.n += weight
        self.kept += 1
        if self.kept == self.capacity:
            self._fold()

    def _fold(self) -> None:
        for weight, values in self.pending.items():
            part = torch.stack(values).float().view(-1, len(self.keys)).sum(0)
            self.totals = part.mul_(weight) if self.totals is None else self.totals.add_(part, alpha=weight)
        self.pending, self.kept = {}, 0

    def reduce(self, prefix: str) -> dict[str, float]:
        """Means over all ranks' samples (one collective), as {prefix/key: value}."""
        self._fold()
        if self.totals is None:
            return {}
        packed = dist.all_reduce_sum(torch.cat([self.totals, self.totals.new_tensor([self.n])]))
        *totals, n = packed.tolist()
        return {f"{prefix}/{k}": v / max(n, 1.0) for k, v in zip(self.keys, totals, strict=True)}


def _train_epoch(job: Any, wrapped: nn.Module, loader: ShardedLoader, strategy: Strategy, state: TrainState,
                 ctx: RunContext, guard: NonFiniteGuard) -> dict[str, float]:
    t = job.trainer
    n_batches, accum = len(loader), t.grad_accum
    sums = MetricSums()
    window_loss, step_samples = None, 0
    log_started, log_steps, log_samples = time.perf_counter(), 0, 0  # since the last logged step
    wrapped.train()
    for i, batch in enumerate(loader.iter_from(state.batch), start=state.batch):
        window_start = i - i % accum
        window = min(accum, n_batches - window_start)  # the last window of an epoch may be shorter
        last_micro = i == window_start + window - 1
        with strategy.no_sync(not last_micro), strategy.autocast():
            out = wrapped(batch.tensors)
        # Weight by this rank's share of the global batch: DDP then averages to exactly the global-batch gradient.
        weight = batch.real * ctx.world / batch.global_size / window
        strategy.backward(out.loss if weight == 1 else out.loss * weight)
        window_loss = out.loss.detach() if window_loss is None else window_loss + out.loss.detach()
        sums.add(out.metrics, batch.real)
        step_samples += batch.global_size
        state.batch = i + 1
        if not last_micro:
            continue
        result = strategy.step(window_loss)
        guard.add(result.skipped)
        state.step += 1
        state.samples += step_samples
        log_steps, log_samples = log_steps + 1, log_samples + step_samples
        window_loss, step_samples = None, 0
        if state.step % t.log_every_n_steps == 0:
            guard.check()  # reads the device back: the clock below covers the device's work, not just the host's
            logged = dist.mean_across_ranks({f"train/{k}": v for k, v in out.metrics.items()}
                                            | {"train/grad_norm": result.grad_norm})
            elapsed = max(time.perf_counter() - log_started, 1e-9)
            ctx.log({"event": "step", "step": state.step, "epoch": state.epoch + i / n_batches, "lr": strategy.lr(),
                     "samples_per_s": log_samples / elapsed, "step_time_s": elapsed / log_steps, **logged})
            log_started, log_steps, log_samples = time.perf_counter(), 0, 0
        if job.checkpoint.every_n_steps and state.step % job.checkpoint.every_n_steps == 0 and i + 1 < n_batches:
            guard.check()
            _report(strategy, state, ctx, {"epoch": state.epoch, "step": state.step}, save=True)
        maybe_kill(ctx.rank, state.step)  # test-only fault injection (DTRAIN_TEST_KILL); a no-op otherwise
        if t.max_steps and state.step >= t.max_steps:
            break
    guard.check()
    return sums.reduce("train")


@torch.no_grad()
def evaluate(wrapped: nn.Module, tensors: tuple[torch.Tensor, ...], batch_size: int, strategy: Strategy,
             ctx: RunContext, prefix: str) -> dict[str, float]:
    """Sample-weighted mean of the model's metrics over a split, sharded across ranks (no sample counted twice)."""
    if len(tensors[0]) == 0:
        return {}
    loader = ShardedLoader(tensors, batch_size, ctx.rank, ctx.world, shuffle=False, eval_mode=True)
    wrapped.eval()
    sums = MetricSums()
    for batch in loader:
        with strategy.autocast():
            out = wrapped(batch.tensors)
        sums.add(out.metrics, batch.real)
    wrapped.train()
    return sums.reduce(prefix)


def _early_stopping(job: Any, state: TrainState, metrics: dict[str, Any]) -> None:
    es = job.trainer.early_stopping
    state.history["last"] = metrics
    key = es.monitor or next((k for k in ("val/loss", "train/loss") if k in metrics), None)
    if key is None or key not in metrics:
        return
    value, sign = metrics[key], (1 if es.mode == "max" else -1)
    if state.best is None or sign * (value - state.best) > es.min_delta:
        state.best, state.best_epoch, state.bad_epochs = value, state.epoch, 0
        state.history["best"] = {**metrics, "monitor": key}
    elif es.monitor is not None:
        state.bad_epochs += 1
        if state.bad_epochs >= es.patience:
            state.stopped = True
            state.stop_reason = f"early stopping: {key} did not improve for {es.patience} epochs"


def _report(strategy: Strategy, state: TrainState, ctx: RunContext, metrics: dict[str, Any], save: bool) -> None:
    if not save:
        ctx.report(metrics, None)
        return
    _check_finite_weights(strategy.unwrapped())
    folder = Path(tempfile.mkdtemp(prefix="dtrain-ckpt-"))
    try:
        strategy.save(folder)
        if ctx.rank == 0:
            atomic_save(dataclasses.asdict(state), folder / STATE_FILE)
        atomic_save(rng_state(), folder / f"rng_rank{ctx.rank}.pt")
        # Sealed last: a checkpoint missing any rank's manifest or file is detected and skipped on resume.
        write_manifest(folder, ctx.rank, ctx.world, {k: getattr(state, k) for k in ("stage", "epoch", "batch", "step")})
        ctx.report(metrics, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_finite_weights(model: nn.Module) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise TrainingError("training stopped: the weights became non-finite; the last good checkpoint is kept")


def _resume(strategy: Strategy, state: TrainState, ctx: RunContext) -> None:
    strategy.load(ctx.resume_dir)
    rng_file = ctx.resume_dir / f"rng_rank{ctx.rank}.pt"
    if rng_file.exists():
        set_rng_state(safe_load(rng_file))
    ctx.log({"event": "resume", "stage": state.stage, "epoch": state.epoch, "batch": state.batch, "step": state.step})


def _batch_size(job: Any, n_train: int, world: int) -> int:
    descent = job.optim.descent
    if descent == "batch":
        return math.ceil(n_train / world)
    if descent == "stochastic":
        return 1
    return job.data.batch_size


def _to(tensors: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in tensors)
