"""Publishing checkpoints written in the background: training never waits for a slow write, and every rank publishes
at the same step boundary, the first one after every rank's write is known to be done. The local launcher's publish
there needs no barrier: the checkpoint it renames into place already holds every rank's files. A publish that is a
barrier of the ranks itself (Ray Train's report) runs in the writer thread instead, and training waits for neither
the other ranks' writes nor the publish."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.engine import dist as engine_dist
from dtrain.engine.checkpoint import checkpoint_problem
from dtrain.engine.dist import StepVote
from dtrain.engine.saving import CheckpointWriter
from dtrain.engine.state import TrainState
from dtrain.launch.net import free_port
from dtrain.launch.spawn import LocalPublisher

TAKEN_AT, STEPS, STEP_S = 3, 40, 0.01
SLOW_WRITE_S = 0.2
"""Rank 1's write takes this long (20 steps' time); rank 0's is immediate."""


class _Strategy:
    """What CheckpointWriter asks of a strategy: a finiteness check, and a snapshot whose write takes write_s."""

    def __init__(self, write_s: float) -> None:
        self.write_s = write_s

    def weights_finite(self) -> bool:
        return True

    def snapshot(self, folder: Path):
        def write() -> None:
            time.sleep(self.write_s)
            (folder / f"part_rank{dist.get_rank()}.bin").write_bytes(b"x")
        return write


def _rank(rank: int, port: int, staging: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    published: list[int] = []
    barriers = []
    engine_dist.barrier = lambda: (barriers.append(1), dist.barrier())
    local = LocalPublisher(Path(staging) / "run")

    def publish(metrics, folder) -> None:
        local(metrics, folder)
        published.append(metrics["step"])
        checkpoint = local.root / f"step_{metrics['step']:08d}"
        # rank 0 renamed it into place: complete, with rank 1's slowly written part
        assert rank == 1 or (checkpoint_problem(checkpoint) is None and (checkpoint / "part_rank1.bin").is_file())

    writer = CheckpointWriter(rank, 2, publish, staging=local.root, assemble=local.assemble)
    vote, state, step_times = StepVote(60.0), TrainState(), []
    strategy = _Strategy(SLOW_WRITE_S if rank == 1 else 0.0)
    for step in range(1, STEPS + 1):
        started = time.perf_counter()
        time.sleep(STEP_S)  # the step's own work
        dist.all_reduce(torch.ones(1))  # and its gradient all-reduce: the ranks keep in step
        state.step = step
        if step == TAKEN_AT:
            writer.start(strategy, state, {"step": step})
        vote.agree(step, writer.writing())
        if writer.publish_if_due(vote.as_of, vote.writing):
            published.append(-step)  # the boundary it was published at
        step_times.append(time.perf_counter() - started)
    writer.finish()
    writer.shutdown()
    vote.close()
    out.put((rank, published, max(step_times), len(barriers)))
    dist.destroy_process_group()


def test_a_slow_write_delays_the_publish_not_the_steps(tmp_path):
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_rank, args=(free_port(), str(tmp_path), queue), nprocs=2, start_method="spawn")
    results = {rank: rest for rank, *rest in (queue.get(), queue.get())}
    (published0, slowest0, barriers0), (published1, slowest1, barriers1) = results[0], results[1]
    # each rank published the checkpoint once, at the same step boundary
    assert published0 == published1 and published0[0] == TAKEN_AT and len(published0) == 2, results
    at = -published0[1]
    # not before rank 1's write (20 steps' time) was done, nor long after: within a few steps of it
    assert TAKEN_AT + 15 <= at <= TAKEN_AT + 30, results
    # and no step waited for the write: the slowest took a small part of the write's time
    assert max(slowest0, slowest1) < SLOW_WRITE_S / 2, results
    # and publishing it waited for no barrier: the vote had said every rank's write was done
    assert barriers0 == barriers1 == 0, results


SLOW_PUBLISH_S = 0.2
"""The barrier publish takes this long once every rank has arrived (a Ray Train controller slow to take a report)."""
BARRIER_STEPS = 80


def _rank_barrier_publish(rank: int, port: int, staging: str, arrived, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    published, barriers = [], []
    engine_dist.barrier = lambda: (barriers.append(1), dist.barrier())

    def publish(metrics, folder) -> None:  # as ray.train.report: every rank arrives, then it takes its time
        arrived.wait()
        time.sleep(SLOW_PUBLISH_S)
        slow_part = list(Path(staging).glob("*/part_rank1.bin"))  # rank 1's write was done before anyone published
        published.append((metrics["step"], threading.current_thread().name, len(slow_part)))

    writer = CheckpointWriter(rank, 2, publish, staging=Path(staging), publish_in_writer=True)
    vote, state, step_times = StepVote(60.0), TrainState(), []
    strategy = _Strategy(SLOW_WRITE_S if rank == 1 else 0.0)
    for step in range(1, BARRIER_STEPS + 1):
        started = time.perf_counter()
        time.sleep(STEP_S)
        dist.all_reduce(torch.ones(1))
        state.step = step
        if step == TAKEN_AT:
            writer.start(strategy, state, {"step": step})
        vote.agree(step, writer.writing())
        writer.publish_if_due(vote.as_of, vote.writing)
        step_times.append(time.perf_counter() - started)
    during = list(published)
    writer.finish()
    writer.shutdown()
    vote.close()
    out.put((rank, during, published, max(step_times), len(barriers)))
    dist.destroy_process_group()


def test_a_publish_that_is_a_barrier_runs_in_the_writer_thread_and_no_step_waits_for_it(tmp_path):
    context = mp.get_context("spawn")
    queue, arrived = context.SimpleQueue(), context.Barrier(2)
    mp.start_processes(_rank_barrier_publish, args=(free_port(), str(tmp_path), arrived, queue), nprocs=2,
                       start_method="spawn")
    results = {rank: rest for rank, *rest in (queue.get(), queue.get())}
    for during, published, slowest, barriers in results.values():
        # published once, by the writer thread, during the steps (the write and publish took half of their time), after
        # the slow rank's write was done
        assert during == published and len(published) == 1, results
        step, thread, slow_parts = published[0]
        assert step == TAKEN_AT and thread.startswith("dtrain-checkpoint") and slow_parts == 1, results
        # no step waited for the slow write, nor for the slow publish, nor at a barrier of its own
        assert slowest < min(SLOW_WRITE_S, SLOW_PUBLISH_S) / 2 and barriers == 0, results
