"""Which launcher `dtrain train` picks on its own: local processes on one machine where no Ray runs and nothing in the
job needs one; Ray where it already runs (an address, RAY_ADDRESS, a `dtrain up` head) or where the job needs it,
saying why; --local and --ray decide. (The runs themselves: tests/distributed/test_local_launcher.py as typed,
tests/ray/test_local_head.py on a head.)"""

from __future__ import annotations

import sys

import pytest

from dtrain.cli import _runs_locally, main, parse_args
from dtrain.config import load_job
from tests.helpers import JOBS

JOB = str(JOBS / "mlp_digits.yaml")


@pytest.fixture(autouse=True)
def no_ray_joined(monkeypatch):
    """This process may have joined the test session's Ray (an earlier test did): these tests are of a command
    started afresh, whose process joined none."""
    ray = sys.modules.get("ray")
    if ray is not None:
        monkeypatch.setattr(ray, "is_initialized", lambda: False)


def _choice(capsys, *argv: str, over: tuple[str, ...] = ()) -> tuple[bool, str]:
    args = parse_args(["train", JOB, *argv])
    local = _runs_locally(args, load_job(JOB, [*args.overrides, *over]))
    return local, capsys.readouterr().out


def test_on_one_machine_with_no_ray_running_the_workers_are_local_processes(capsys):
    local, out = _choice(capsys)
    assert local and out.startswith("[dtrain] the workers run as processes on this machine (no Ray is running")


@pytest.mark.parametrize("over, reason", [
    (["trainer.max_failures=2"], "trainer.max_failures: 2: restarts need Ray"),
    (["trainer.num_workers=[1,2]", "data.global_batch_size=64"],
     "trainer.num_workers: an elastic range [1, 2] needs Ray"),
    (["data.name=parquet", "data.path=rows"], "data.name: parquet streams through Ray Data"),
    (["runs_dir=s3://bucket/runs"], "runs_dir: s3://bucket/runs: a run directory in object storage needs Ray"),
])
def test_a_job_that_needs_ray_starts_one_and_says_why(capsys, over, reason):
    local, out = _choice(capsys, *over)
    assert not local and out == f"[dtrain] starting Ray on this machine: {reason}\n"


@pytest.mark.parametrize("argv", [["--ray"], ["--address", "127.0.0.1:6379"]])
def test_ray_chosen_on_the_command_line_is_used_without_a_word(capsys, argv):
    assert _choice(capsys, *argv) == (False, "")


def test_ray_address_in_the_environment_means_that_cluster(capsys, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # as Ray Jobs sets it for an entrypoint
    assert _choice(capsys) == (False, "")


def test_a_ray_this_process_joined_is_used(capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # as after ray.init() in a notebook or a test session
    assert _choice(capsys) == (False, "")


def test_a_head_kept_by_dtrain_up_is_used(capsys, monkeypatch):
    from dtrain.launch import local_head

    monkeypatch.setattr(local_head, "running_address", lambda: "127.0.0.1:6379")  # the real one: test_local_head
    assert _choice(capsys) == (False, "")


def test_local_asked_for_is_local_even_for_a_job_that_needs_ray_which_it_then_refuses(capsys):
    assert _choice(capsys, "--local", "trainer.max_failures=2") == (True, "")
    assert main(["train", JOB, "--local", "trainer.max_failures=2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "dtrain: error: trainer.max_failures: 2: restarts need Ray; --local takes in-memory data, a fixed worker "
        "count, no restarts and a run directory on this machine (run without --local)")


def test_local_and_ray_together_are_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(["train", JOB, "--local", "--ray"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("dtrain: error: argument --ray: not allowed with argument --local")


@pytest.mark.parametrize("cpus, env, threads", [(1, None, 1), (0.5, None, 1), (2.7, None, 2), (1, "3", 3)])
def test_a_local_rank_gets_the_threads_ray_would_give_its_worker(monkeypatch, cpus, env, threads):
    from dtrain.launch.spawn import threads_per_rank

    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    assert threads_per_rank({"trainer": {"cpus_per_worker": cpus}}) == threads


def test_the_fork_server_imports_deepspeed_only_for_a_deepspeed_job():
    """DeepSpeed takes as long to import as torch: a DDP or FSDP job's ranks never import it, so their fork server
    must not wait for it before the first rank can start."""
    from dtrain.launch.spawn import PRELOAD, _preload

    assert _preload("ddp") == _preload("fsdp") == PRELOAD and "deepspeed" not in PRELOAD
    assert _preload("deepspeed") == [*PRELOAD, "deepspeed"]  # this torch is built without CUDA
