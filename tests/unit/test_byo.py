"""Bring your own model and data, in-process: a model by entry point (an installed distribution's metadata, as pip
writes it) listed by `dtrain models` and validated like the catalog, the module adapter's losses and metrics on
any importable nn.Module (torch's own nn.Linear included), a data loader by import path, and where the user's
project is found."""

from __future__ import annotations

import sys

import pytest
import torch
from omegaconf import OmegaConf

from dtrain.cli import main
from dtrain.config import build_job, load_job, to_dict, to_objects
from dtrain.data import load_data
from dtrain.errors import ConfigError
from dtrain.launch.project import add_user_code, project_dir, shipped_paths
from dtrain.launch.spawn import LocalPublisher
from dtrain.launch.worker import run_worker
from dtrain.models import build_model, check_step, lookup_model
from tests.helpers import ROOT

PROJECT = ROOT / "examples/user_project"


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """mynets installed as a distribution would be: its metadata folder on the import path, with two entry points
    in the dtrain.models group, one of them broken."""
    info = tmp_path / "site" / "mynets-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mynets\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[dtrain.models]\ntiny_resnet = mynets.resnet:TinyResNet\n"
                                           "gone = mynets.gone:Model\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.syspath_prepend(str(PROJECT))


def _job(model: dict, data: dict | None = None, **over) -> dict:
    base = {"name": "t", "model": model, "data": data or {"name": "digits", "batch_size": 64},
            "trainer": {"max_epochs": 1, "num_workers": 1},
            "logging": {"progress": False, "wandb": {"enabled": "false"}}, **over}
    return to_dict(build_job(OmegaConf.create(base)))


def test_plugin_by_entry_point_is_listed_validated_and_trains(plugins, tmp_path, capsys, one_thread):
    cfg_cls, model_cls, description = lookup_model("tiny_resnet")
    assert model_cls.__name__ == "TinyResNet" and description.startswith("A residual CNN")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "tiny_resnet: A residual CNN for small images shaped (channels, height, width). (mynets.resnet:TinyResNet)" \
        in out
    assert "    channels: int = 16" in out  # its Config's fields, as the catalog's are listed
    assert "gone: mynets.gone:Model (unusable: model.name: plugin 'gone' (mynets.gone:Model): cannot import" in out
    with pytest.raises(ConfigError, match="unknown key 'model.width'"):
        _job({"name": "tiny_resnet", "width": 3}, {"name": "digits", "options": {"image": True}})
    job = _job({"name": "tiny_resnet", "channels": 8, "blocks": 1}, {"name": "digits", "options": {"image": True}})
    summary = run_worker(job, tmp_path / "run", LocalPublisher(tmp_path / "run"), torch.device("cpu"))
    assert summary["test"]["test/acc"] > 0.5


def test_unknown_name_lists_catalog_and_plugins(plugins):
    with pytest.raises(ConfigError, match=r"model.name: expected one of .*mlp.*module.*gone, tiny_resnet, or an "
                                          r"import path module:Class, got 'resnet'"):
        lookup_model("resnet")


# (loss, data set, nn.Linear's args, metric, how good it must get in 3 epochs: a constant guess gets acc 0.1 on
# digits, 0.63 on breast_cancer, mae 0.47 on its 0/1 labels)
CASES = [("cross_entropy", "digits", {"in_features": 64, "out_features": 10}, "acc", lambda v: v > 0.9),
         ("bce_logits", "breast_cancer", {"in_features": 30, "out_features": 1}, "acc", lambda v: v > 0.9),
         ("mse", "breast_cancer", {"in_features": 30, "out_features": 1}, "mae", lambda v: v < 0.35)]


@pytest.mark.parametrize("loss, data, args, metric, good", CASES, ids=[c[0] for c in CASES])
def test_module_adapter_trains_torch_linear_with_each_loss(loss, data, args, metric, good, tmp_path, one_thread):
    job = _job({"name": "module", "target": "torch.nn:Linear", "args": args, "loss": loss, "metrics": [metric]},
               {"name": data, "batch_size": 32}, trainer={"max_epochs": 3, "num_workers": 1}, optim={"lr": 0.03})
    obj = to_objects(job)
    bundle = load_data(obj.data)
    check_step(build_model(obj.model, bundle.meta), tuple(t[:2] for t in bundle.train))
    summary = run_worker(job, tmp_path, LocalPublisher(tmp_path), torch.device("cpu"))
    assert good(summary["test"][f"test/{metric}"]), summary["test"]


def test_module_adapter_fills_data_parameters_and_reconstructs_without_targets(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT))
    obj = to_objects(_job({"name": "module", "target": "mynets.nets:SmallNet", "args": {"width": 8}}))
    bundle = load_data(obj.data)
    model = build_model(obj.model, bundle.meta)
    assert model.net.net[1].in_features == 64 and model.net.net[-1].out_features == 10  # from the data
    assert model(bundle.train).loss.item() > 1.0  # cross_entropy by default for classification
    auto = to_objects(_job({"name": "module", "target": "torch.nn:Linear", "loss": "mse",
                            "args": {"in_features": 64, "out_features": 64}}))
    auto_model = build_model(auto.model, bundle.meta)
    out = auto_model((bundle.train[0],))  # no targets: the features are the target (mse)
    expected = torch.mean((auto_model.net(bundle.train[0]) - bundle.train[0]) ** 2)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_data_by_import_path_is_split_like_a_built_in_set(monkeypatch):
    monkeypatch.syspath_prepend(str(PROJECT))
    obj = to_objects(_job({"name": "mlp"}, {"name": "mynets.data:spirals", "options": {"n": 200, "seed": 3}}))
    bundle = load_data(obj.data)
    assert bundle.meta.num_classes == 2 and bundle.meta.input_shape == (2,)
    assert len(bundle.train[0]) + len(bundle.val[0]) + len(bundle.test[0]) == 200
    assert abs(float(bundle.train[0].mean())) < 0.1  # standardised with the training statistics, as built-in sets


def test_the_job_files_project_and_the_current_folder_go_on_the_path(tmp_path, monkeypatch):
    assert project_dir(PROJECT / "jobs" / "resnet_digits.yaml") == PROJECT  # its pyproject.toml
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "job.yaml").write_text("model: {name: mlp}\n")
    monkeypatch.chdir(ROOT)
    assert project_dir(loose / "job.yaml") is None  # no project above it, and not under the current folder
    monkeypatch.chdir(tmp_path)
    assert project_dir(loose / "job.yaml") == tmp_path
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in (str(PROJECT), str(tmp_path))])
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    add_user_code(PROJECT / "jobs" / "resnet_digits.yaml")
    assert shipped_paths()[:2] == [str(PROJECT), str(tmp_path)] and shipped_paths()[-1] == "/elsewhere"
    assert sys.path[:2] == [str(PROJECT), str(tmp_path)]
    assert load_job(PROJECT / "jobs" / "resnet_digits.yaml").model.name == "mynets.resnet:TinyResNet"
