"""A Ray worker told that it or its node is going away (a SIGTERM: a spot reclaim, a pod deletion; Ray's notice that
a node of the worker group is being drained for preemption) makes the run checkpoint at the next step boundary every
rank agrees on and hand over, instead of losing the steps since the last scheduled checkpoint."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

from dtrain.compat import ray as ray_compat
from dtrain.engine.stop import TRAINING, stop_if_training

NOTICE_POLL_S = 0.5
"""Seconds between a worker's reads of its copy of Ray's preemption notice (a local read; Ray Train's watcher
itself polls the cluster's draining nodes, every 5 s by default)."""


def graceful_sigterm() -> None:
    """Installed in every Ray worker process of a dtrain run (runtime_env worker_process_setup_hook): the first
    SIGTERM during training asks the loop to stop; otherwise, or at a second one, Ray's own handler exits."""
    ray_compat.wrap_worker_sigterm(stop_if_training)


@contextlib.contextmanager
def stop_on_preemption_notice(rank: int) -> Iterator[None]:
    """While the block runs (a Ray Train worker's training): once Ray notices that a node of the worker group is
    being drained for preemption, the training loop is asked to stop as at a SIGTERM. The drained node takes no new
    workers, so Ray's restart (trainer.max_failures) continues from that checkpoint on the nodes that stay: within
    an elastic trainer.num_workers range, with fewer workers."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(NOTICE_POLL_S):
            notice = ray_compat.preemption_notice()
            if notice is not None and TRAINING.is_set() and stop_if_training():  # the first rank to read it says so
                left = (f"{max(0.0, notice.deadline_ms / 1000 - time.time()):.0f} s left" if notice.deadline_ms
                        else "no deadline given")
                print(f"[dtrain] rank {rank}: node(s) {', '.join(n[:8] for n in notice.preempted_node_ids)} of ranks "
                      f"{notice.preempted_ranks} are being preempted ({left}): checkpointing at the next step "
                      "boundary, then handing over", flush=True)
                return

    thread = threading.Thread(target=watch, name="dtrain-preemption-notice", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
