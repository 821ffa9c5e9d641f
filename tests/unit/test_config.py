import subprocess
import sys

import pytest

from dtrain.config import load_job, to_objects
from dtrain.errors import ConfigError
from tests.helpers import JOBS, ROOT

MLP = JOBS / "mlp_digits.yaml"


def test_job_loads_with_overrides_and_model_schema():
    job = load_job(MLP, ["trainer.num_workers=3", "model.hidden=[8,4]", "optim.lr=0.1"])
    obj = to_objects(job)
    assert obj.trainer.num_workers == 3 and obj.model.hidden == [8, 4] and obj.optim.lr == 0.1
    assert type(obj.model).__name__ == "MLPConfig"


@pytest.mark.parametrize("override, needle", [
    ("trainer.bogus=1", "unknown key 'trainer.bogus'"),
    ("model.depth=3", "unknown key 'model.depth'"),
    ("optim.lr=-1", "optim.lr: expected a number > 0"),
    ("trainer.precision=fp8", "trainer.precision: expected one of 32, bf16-mixed, fp16-mixed"),
    ("trainer.max_epochs=abc", "trainer.max_epochs"),
    ("trainer.strategy=horovod", "trainer.strategy: expected one of ddp, deepspeed"),
    ("model.name=transformer", "model.name: expected one of"),
    ("trainer.grad_clip_mode=both", "trainer.grad_clip_mode"),
    ("data.batch_size=0", "data.batch_size: expected an integer >= 1"),
    ("noequals", "expected key=value"),
])
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError, match=None) as info:
        load_job(MLP, [override])
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_job(scalar)


def test_cli_config_error_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "dtrain", "config", str(MLP), "trainer.bogus=1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"dtrain: error: {MLP}: unknown key 'trainer.bogus'"


def test_cli_config_prints_resolved_yaml():
    proc = subprocess.run([sys.executable, "-m", "dtrain", "config", str(MLP), "trainer.num_workers=4"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "num_workers: 4" in proc.stdout and "strategy: ddp" in proc.stdout


def test_ray_train_controller_polls_fast_for_few_workers_and_slower_for_many(monkeypatch):
    import os

    from dtrain.launch.train import POLL_ENV, _controller_env, poll_interval

    assert [poll_interval(n) for n in (1, 8, 9, 64, 1000)] == ["0.05", "0.05", "0.1", "0.4", "2"]
    monkeypatch.delenv(POLL_ENV, raising=False)
    with _controller_env({POLL_ENV: "0.05"}):
        assert os.environ[POLL_ENV] == "0.05"
    assert POLL_ENV not in os.environ  # the driver's environment is left as it was


def test_an_elastic_worker_range_becomes_ray_trains_elastic_scaling():
    from dtrain.launch.train import local_workers, scaling_config

    elastic = load_job(JOBS / "mlp_digits.yaml", ["trainer.num_workers=[1,3]", "data.global_batch_size=60",
                                                 "trainer.resize_check_s=7"])
    assert scaling_config(elastic, 1, False).num_workers == (1, 3)
    assert scaling_config(elastic, 1, False).elastic_resize_monitor_interval_s == 7
    assert scaling_config(elastic, 1, False, elastic=False).num_workers == 1  # dtrain preflight places the min
    assert local_workers(elastic) == 1  # what must fit before the run starts
    fixed = load_job(JOBS / "mlp_digits.yaml", ["trainer.num_workers=[2,2]", "data.global_batch_size=60"])
    assert scaling_config(fixed, 2, False).num_workers == 2
