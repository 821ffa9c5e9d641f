"""Engine overhead measured in paired blocks: dtrain's loop and hand-written loops take turns in the same processes.

Whole-run comparisons on a shared machine drift by 10-15 % from one run to the next, more than the 3 % the engine
is allowed to cost. Here all loops live in the same process(es): the engine (`loop.fit` with `DDPStrategy`, as
`dtrain train` runs it on each rank) trains the job, logging every --log-every steps (dtrain's default 10), and
every --block steps its log callback runs --block steps of each hand-written loop (its own copy of the model, DDP
when there are 2 ranks, fused Adam, same batch size): `hand`, the bare loop, and `hand_metrics`, which also
computes what the engine reports every step (training loss and accuracy summed on the device, total gradient
norm). Each engine window has the hand windows right next to it, a second or less apart, so slow phases of the
machine hit all of them. Reported: the ratio of total hand time to total engine time (the engine's epoch ends and
metric read-backs included), and the median and quartiles of the per-pair ratios.

    python -m benchmarks.paired [--work small|digits] [--world 1|2] [--steps 3000] [--block 50]
                                 [--log-every 10] [--device cpu|cuda] [--ray]
    python -m benchmarks.paired --pool FILE [FILE ...]   # saved runs of the same work as one ratio

  small   the hot-path case: MLP 64 -> 256 -> 128 -> 10, batch 256, synthetic data, where host work sets the pace
  digits  the `make bench` overhead job: catalog MLP 64 -> 1024 -> 1024 -> 10 on digits, 64 rows per rank
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from benchmarks.common import median, mlp_job, save, synthetic_classification

WARMUP_PAIRS = 2


def _job(work: str, steps: int, log_every: int, world: int) -> dict[str, Any]:
    if work == "small":  # digits' shape (64 features, 10 classes); _data swaps in synthetic rows
        return mlp_job([256, 128], 256, 10**6, num_workers=world, log_every_n_steps=log_every, max_steps=steps)
    return mlp_job([1024, 1024], 64, 10**6, num_workers=world, log_every_n_steps=log_every, max_steps=steps)


def _data(job: dict[str, Any], work: str) -> Any:
    from dtrain.config import to_objects
    from dtrain.data import load_data
    from dtrain.data.base import DataBundle
    from dtrain.models.base import DataMeta

    if work == "small":
        x, y = synthetic_classification(256 * 400, (64,), 10)
        empty = (x[:0], y[:0])
        return DataBundle((x, y), empty, empty, DataMeta((64,), num_classes=10))
    return load_data(to_objects(job).data)


def batches(x: torch.Tensor, y: torch.Tensor, batch: int, rank: int, world: int, epochs: int | None = None,
            drop_last: bool = True) -> Iterator[tuple[Any, Any]]:
    """A hand-written loop's batches: a fresh permutation each epoch (seeded by the epoch), each global batch of
    batch * world rows dealt round-robin to the ranks; endless unless epochs is given."""
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).to(x.device)
        end = len(x) - batch * world + 1 if drop_last else len(x)
        for start in range(0, end, batch * world):
            idx = order[start:start + batch * world][rank::world]
            yield x[idx], y[idx]
        epoch += 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _HandLoop:
    """A plain PyTorch training loop over its own copy of net, run --block steps at a time."""

    def __init__(self, net: torch.nn.Module, job: Any, x: torch.Tensor, y: torch.Tensor, rank: int, world: int,
                 device: torch.device, metrics: bool, ddp_options: dict[str, Any] | None = None) -> None:
        net = copy.deepcopy(net).to(device)
        self.model = net
        if world > 1:
            with warnings.catch_warnings():  # as in dtrain's DDP strategy: the name is deprecated, the behaviour kept
                warnings.simplefilter("ignore", FutureWarning)
                self.model = torch.nn.parallel.DistributedDataParallel(net, broadcast_buffers=False,
                                                                       **(ddp_options or {}))
        self.params = list(net.parameters())
        self.opt = torch.optim.Adam(self.params, lr=job.optim.lr, fused=True)
        self.batches = batches(x, y, job.data.batch_size, rank, world)
        self.device, self.metrics = device, metrics
        self.sums = torch.zeros(2, device=device)

    def run(self, steps: int) -> float:
        _sync(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            xb, yb = next(self.batches)
            logits = self.model(xb)
            loss = F.cross_entropy(logits, yb)
            loss.backward()
            if self.metrics:
                self.norm = torch.nn.utils.get_total_norm([p.grad for p in self.params])
                self.sums += torch.stack([loss.detach(), (logits.argmax(-1) == yb).float().mean()])
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        _sync(self.device)
        return time.perf_counter() - started


class _Turns:
    """The hand loops and the clock: wraps a log callback so that every `block` engine steps the hand loops run."""

    def __init__(self, net: torch.nn.Module, job: Any, train: tuple[torch.Tensor, ...], rank: int, world: int,
                 device: torch.device, block: int) -> None:
        x, y = (t.to(device) for t in train)
        # Two hand-written loops, each with its own copy of the layers (same initial weights), DDP wrapper, fused
        # Adam and batches: "hand" is the bare loop; "hand_metrics" also computes what the engine reports every step
        # (training loss and accuracy summed on the device, the total gradient norm), written as a user would.
        self.hands = {name: _HandLoop(net, job, x, y, rank, world, device, metrics=name == "hand_metrics")
                      for name in ("hand", "hand_metrics")}
        self.times: dict[str, list[float]] = {"engine": [], **{name: [] for name in self.hands}}
        self.block, self.resumed = block, time.perf_counter()

    def wrap(self, log: Any) -> Any:
        def timed_log(record: dict[str, Any]) -> None:
            log(record)  # the engine's own logging is part of its window
            if record.get("event") != "step" or record["step"] % self.block:
                return
            self.times["engine"].append(time.perf_counter() - self.resumed)  # just read back: the device is idle
            for name, hand in self.hands.items():
                self.times[name].append(hand.run(self.block))
            self.resumed = time.perf_counter()

        return timed_log


def _rank(rank: int, world: int, port: int, job_dict: dict[str, Any], work: str, steps: int, block: int,
          device_type: str, out_file: str) -> None:
    from dtrain.config import to_objects
    from dtrain.engine.loop import RunContext, fit
    from dtrain.launch.worker import build_worker

    torch.set_num_threads(1)
    device = torch.device(device_type)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    job = to_objects(job_dict)
    data = _data(job_dict, work)
    w = build_worker(job, device, data)
    turns = _Turns(w.model.net, job, data.train, rank, world, device, block)
    ctx = RunContext(rank, world, lambda m, f: None, turns.wrap(lambda record: None))
    fit(w.model, w.loaders, w.strategy, w.loop, ctx)
    if rank == 0:
        Path(out_file).write_text(json.dumps(turns.times))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


TIMES_FILE = "paired_times.json"


def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function for --ray: dtrain's own, with the engine's fit wrapped so that its log
    callback also runs the hand loops in turns (in this Ray worker, on this rank's share of the batches)."""
    from dtrain.config import to_objects
    from dtrain.launch import worker
    from dtrain.launch.train import train_loop_per_worker

    real_fit, job = worker.fit, to_objects(config["job"])

    def fit(model: Any, loaders: Any, strategy: Any, loop: Any, ctx: Any) -> dict[str, Any]:
        turns = _Turns(model.net, job, loaders.train.tensors, ctx.rank, ctx.world, strategy.device,
                       config["paired_block"])
        ctx.log = turns.wrap(ctx.log)
        summary = real_fit(model, loaders, strategy, loop, ctx)
        if ctx.rank == 0:
            (Path(config["run_dir"]) / TIMES_FILE).write_text(json.dumps(turns.times))
        return summary

    worker.fit = fit
    train_loop_per_worker(config)


def _through_ray(job: dict[str, Any], block: int, tmp: str) -> dict[str, list[float]]:
    """`dtrain train`'s path (fit_job: embedded Ray, Ray Train workers, rank 0's tracker) with the hand loops in
    the same Ray workers. fit_job is dtrain's own; only the per-worker function is swapped for _ray_worker."""
    from omegaconf import OmegaConf

    from dtrain.launch import train as launch

    cfg = OmegaConf.create(job)
    cfg.runs_dir, cfg.name = tmp, "paired"

    def per_worker(config: dict[str, Any]) -> None:  # pickled by value, block included
        _ray_worker({**config, "paired_block": block})

    real = launch.train_loop_per_worker
    launch.train_loop_per_worker = per_worker
    try:
        launch.fit_job(cfg)
    finally:
        launch.train_loop_per_worker = real
    return json.loads((Path(tmp) / "paired" / TIMES_FILE).read_text())


def measure(work: str = "small", world: int = 1, steps: int = 3000, block: int = 50, log_every: int = 10,
            device: str = "cpu", ray: bool = False) -> dict[str, Any]:
    """Run the paired blocks (ray: inside `dtrain train`'s Ray workers); engine/hand as the ratio of total times and
    as the spread of per-pair ratios."""
    from dtrain.launch.net import free_port

    if block % log_every:
        raise ValueError(f"block: expected a multiple of log_every ({log_every}), got {block}")
    job = _job(work, steps, log_every, world)
    with tempfile.TemporaryDirectory() as tmp:
        if ray:
            if work != "digits":
                raise ValueError("--ray: only --work digits (dtrain train loads its data set itself)")
            raw = _through_ray(job, block, tmp)
        else:
            out = os.path.join(tmp, "times.json")
            args = (world, free_port(), job, work, steps, block, device, out)
            if world == 1:
                _rank(0, *args)
            else:
                mp.start_processes(_rank, args=args, nprocs=world, start_method="spawn")
            raw = json.loads(Path(out).read_text())
    times = {k: v[WARMUP_PAIRS:] for k, v in raw.items()}
    result: dict[str, Any] = {"work": work, "world": world, "device": device, "block": block, "log_every": log_every,
                              "through": "dtrain train (Ray Train)" if ray else "engine", "pairs": len(times["engine"]),
                              "times_s": times}
    for name in ("hand", "hand_metrics"):
        ratios = sorted(h / e for h, e in zip(times[name], times["engine"], strict=True))
        q = len(ratios) // 4
        result[f"{name}_steps_s"] = block * len(times[name]) / sum(times[name])
        result[f"engine_vs_{name}"] = sum(times[name]) / sum(times["engine"])
        result[f"engine_vs_{name}_pairs"] = {"median": median(ratios), "quartiles": [ratios[q], ratios[-q - 1]],
                                             "ci95": ratio_ci(times[name], times["engine"])}
    result["engine_steps_s"] = block * len(times["engine"]) / sum(times["engine"])
    return result


def ratio_ci(hand: list[float], engine: list[float], level: float = 0.95, draws: int = 4000) -> list[float]:
    """Bootstrap interval of sum(hand) / sum(engine): pairs drawn with replacement (a pair keeps its neighbouring
    windows together, so the machine's slow phases stay matched). How far the ratio can be trusted: its spread
    narrows with the square root of the number of pairs."""
    return pooled_ci([(hand, engine)], level, draws)


def pooled_ci(runs: list[tuple[list[float], list[float]]], level: float = 0.95, draws: int = 4000) -> list[float]:
    """ratio_ci over several runs' (hand, engine) times together: each run's pairs are drawn from that run only, so
    runs of different pace (another session, another load) each keep their weight."""
    gen = torch.Generator().manual_seed(0)
    h_sum = e_sum = torch.zeros(draws, dtype=torch.float64)
    for hand, engine in runs:
        h, e = torch.tensor(hand, dtype=torch.float64), torch.tensor(engine, dtype=torch.float64)
        idx = torch.randint(len(h), (draws, len(h)), generator=gen)
        h_sum, e_sum = h_sum + h[idx].sum(1), e_sum + e[idx].sum(1)
    ratios = (h_sum / e_sum).sort().values
    tail = (1 - level) / 2
    return [ratios[int(tail * draws)].item(), ratios[int((1 - tail) * draws) - 1].item()]


def pool(files: list[str]) -> dict[str, Any]:
    """Several saved runs of this benchmark (same work) as one measurement: ratio of all hand time to all engine
    time, with pooled_ci's interval."""
    runs = [json.loads(Path(f).read_text()) for f in files]
    if len({(r["work"], r["world"], r["block"], r["through"]) for r in runs}) > 1:
        raise ValueError("--pool: the files measure different work (work, world, block or path differ)")
    result: dict[str, Any] = {k: runs[0][k] for k in ("work", "world", "block", "through")}
    result |= {"files": [Path(f).name for f in files], "runs": len(runs),
               "pairs": sum(len(r["times_s"]["engine"]) for r in runs)}
    for name in ("hand", "hand_metrics"):
        pairs = [(r["times_s"][name], r["times_s"]["engine"]) for r in runs]
        result[f"engine_vs_{name}"] = sum(sum(h) for h, _ in pairs) / sum(sum(e) for _, e in pairs)
        result[f"engine_vs_{name}_ci95"] = pooled_ci(pairs)
        result[f"engine_vs_{name}_per_run"] = per_run = [r[f"engine_vs_{name}"] for r in runs]
        result[f"engine_vs_{name}_between_runs"] = between_runs_ci(per_run)
    return result


def between_runs_ci(ratios: list[float], level: float = 0.95) -> list[float]:
    """Student-t interval of the mean of per-run ratios. pooled_ci only knows the spread between pairs of a run;
    runs also differ from one another (the machine's state, Ray's processes), and this interval includes that."""
    from scipy.stats import t

    if len(ratios) < 2:
        return [float("nan"), float("nan")]
    n, mean = len(ratios), sum(ratios) / len(ratios)
    se = (sum((r - mean) ** 2 for r in ratios) / (n - 1) / n) ** 0.5
    half = float(t.ppf((1 + level) / 2, n - 1)) * se
    return [mean - half, mean + half]


def summary(r: dict[str, Any]) -> str:
    pairs = r["engine_vs_hand_pairs"]
    return (f"[paired] {r['work']} x{r['world']} via {r['through']} ({r['pairs']} pairs of {r['block']} steps): engine "
            f"{r['engine_steps_s']:.1f}, hand {r['hand_steps_s']:.1f}, hand+metrics {r['hand_metrics_steps_s']:.1f} "
            f"steps/s; engine/hand {r['engine_vs_hand']:.3f} (95 % interval {pairs['ci95'][0]:.3f}-"
            f"{pairs['ci95'][1]:.3f}, pair median {pairs['median']:.3f}), engine/(hand+metrics) "
            f"{r['engine_vs_hand_metrics']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="small", choices=["small", "digits"])
    parser.add_argument("--world", type=int, default=None, help="processes (default: 1 for small, 2 for digits)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--block", type=int, default=50)
    parser.add_argument("--log-every", type=int, default=10, help="the engine's trainer.log_every_n_steps")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray", action="store_true", help="run inside `dtrain train`'s Ray Train workers (digits)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--pool", nargs="+", metavar="FILE", help="combine saved runs into one ratio (runs nothing)")
    args = parser.parse_args()
    if args.pool:
        r = pool(args.pool)
        ci, ci_m, runs = r["engine_vs_hand_ci95"], r["engine_vs_hand_metrics_ci95"], r["engine_vs_hand_between_runs"]
        print(f"[paired] {r['runs']} runs, {r['pairs']} pairs, {r['work']} x{r['world']} via {r['through']}: "
              f"engine/hand {r['engine_vs_hand']:.3f} (95 % interval {ci[0]:.3f}-{ci[1]:.3f}; between runs "
              f"{runs[0]:.3f}-{runs[1]:.3f}), engine/(hand+metrics) {r['engine_vs_hand_metrics']:.3f} "
              f"({ci_m[0]:.3f}-{ci_m[1]:.3f})")
        if args.out:
            print(save(f"paired_{r['work']}_x{r['world']}_pooled", r, args.out))
        return
    world = args.world or (1 if args.work == "small" else 2)
    r = measure(args.work, world, args.steps, args.block, args.log_every, args.device, args.ray)
    print(summary(r), flush=True)
    print(save(f"paired_{r['work']}_x{r['world']}" + ("_ray" if args.ray else ""), r, args.out))


if __name__ == "__main__":
    main()
