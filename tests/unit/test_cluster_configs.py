"""cluster/ templates: YAML parses, required fields are there, autoscaler configs pass Ray's own schema."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess

import pytest
import yaml

from tests.helpers import ROOT

CLUSTER = ROOT / "cluster"
SCRIPTS = ["local/up.sh", "local/down.sh", "slurm/dtrain.sbatch"]


def _load_all(path):
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_autoscaler_config_passes_rays_schema_with_gpu_workers(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / name).read_text())
    # prepare_config fills provider defaults the way `ray up` does; validate_config applies ray-schema.json.
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) >= 1 and all(t["max_workers"] >= 1 for t in gpu_types)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in commands)
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert any("-e ~/dtrain" in c for c in config["setup_commands"])


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_spot_templates_submit_an_elastic_job_that_survives_reclaims(name):
    """Spot nodes get reclaimed: the template's job restarts (max_failures) within a worker range, and that job
    loads (the range needs a global batch that it splits)."""
    from dtrain.config import load_job

    text = (CLUSTER / name).read_text()
    assert "spot" in text.lower()
    usage = " ".join(line.lstrip("# ").rstrip(" \\") for line in text.splitlines()[:6])
    overrides = [w for w in usage.split() if "=" in w and w.split("=")[0].startswith(("trainer.", "data."))]
    job = load_job(ROOT / "jobs" / "mlp_digits.yaml", overrides)
    assert job.trainer.max_failures >= 1 and list(job.trainer.num_workers) == [2, 8]


def test_autoscaler_schema_check_catches_a_broken_config():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["ray.worker.gpu1"]["not_a_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def _ray_containers(cluster_spec):
    head = cluster_spec["headGroupSpec"]["template"]["spec"]["containers"]
    workers = [c for g in cluster_spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    return head, workers


def _check_ray_cluster_spec(spec):
    assert spec["rayVersion"].startswith("2.")
    assert spec["authOptions"]["mode"] == "token"
    head, workers = _ray_containers(spec)
    assert {p["containerPort"] for p in head[0]["ports"]} >= {6379, 8265}
    assert spec["headGroupSpec"]["rayStartParams"]["num-gpus"] == "0"
    groups = spec["workerGroupSpecs"]
    assert all({"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= g.keys() for g in groups)
    assert all(g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"] for g in groups)
    for c in workers:
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]
    assert len({c["image"] for c in head + workers}) == 1  # head and workers must run the same Ray and code


def test_kuberay_raycluster_manifest():
    docs = _load_all(CLUSTER / "kuberay" / "raycluster.yaml")
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"RayCluster", "PersistentVolumeClaim"}
    cluster = kinds["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    _check_ray_cluster_spec(cluster["spec"])
    assert kinds["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_kuberay_rayjob_manifest_runs_dtrain_on_the_cluster():
    from dtrain.config import load_job

    (job,) = _load_all(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    _check_ray_cluster_spec(spec["rayClusterSpec"])
    assert spec["shutdownAfterJobFinishes"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]["RAY_TRAIN_V2_ENABLED"] == "1"
    # The entrypoint is a real `dtrain train` call: its job file and overrides load here too.
    m = re.fullmatch(r"python -m dtrain train /home/ray/dtrain/(\S+) (.*) --address auto", spec["entrypoint"])
    assert m, spec["entrypoint"]
    cfg = load_job(ROOT / m.group(1), m.group(2).split())
    gpus = sum(int(g["maxReplicas"]) for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    assert cfg.trainer.num_workers <= gpus and str(cfg.trainer.use_gpu).lower() == "true"


def test_dockerfile_matches_the_ray_version():
    import ray

    text = (CLUSTER / "kuberay" / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray.__version__}-py311-gpu" in text
    (job,) = _load_all(CLUSTER / "kuberay" / "rayjob.yaml")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse(script):
    bash = shutil.which("bash")
    result = subprocess.run([bash, "-n", str(CLUSTER / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_slurm_script_starts_head_and_workers_then_trains():
    text = (CLUSTER / "slurm" / "dtrain.sbatch").read_text()
    assert re.search(r"^#SBATCH --nodes=\d+", text, re.M) and re.search(r"^#SBATCH --gpus-per-node=\d+", text, re.M)
    assert "ray start --head --block" in text and "ray start --block --address=" in text
    assert "export RAY_AUTH_MODE=token" in text
    assert 'python -m dtrain train "$JOB" "$@" --address "$HEAD_IP:$PORT"' in text


def test_local_scripts_bind_127_0_0_1_and_stop_only_their_own_processes():
    up = (CLUSTER / "local" / "up.sh").read_text()
    down = (CLUSTER / "local" / "down.sh").read_text()
    assert "--node-ip-address 127.0.0.1" in up and "--dashboard-host 127.0.0.1" in up
    assert "ray stop" not in up + down  # it would kill every Ray on the machine
    assert 'kill -TERM "$pid"' in down
