"""Each library's private APIs that dtrain relies on still exist in the installed versions; when an upgrade moves
one, its compat module's check names it (dtrain/compat/{torch,deepspeed,ray,sklearn}.py)."""

from __future__ import annotations

import importlib

import pytest

from dtrain.compat import CompatError


@pytest.mark.parametrize("library", ["torch", "deepspeed", "ray", "sklearn"])
def test_private_apis_dtrain_uses_are_there(library):
    importlib.import_module(f"dtrain.compat.{library}").check()


@pytest.mark.parametrize(("library", "module", "cls", "attr", "named"), [
    ("torch", "torch", None, "_foreach_norm", "torch._foreach_norm"),
    ("deepspeed", "deepspeed.runtime.engine", "DeepSpeedEngine", "clip_fp32_gradients",
     "DeepSpeedEngine.clip_fp32_gradients"),
    ("ray", "ray.train.v2._internal.execution.controller.controller", "TrainController", "abort",
     "TrainController.abort"),
])
def test_a_moved_symbol_is_named(library, module, cls, attr, named, monkeypatch):
    owner = importlib.import_module(module)
    monkeypatch.delattr(getattr(owner, cls) if cls else owner, attr)
    with pytest.raises(CompatError, match=rf"private APIs moved: .*{named.replace('.', '[.]')}"):
        importlib.import_module(f"dtrain.compat.{library}").check()


def test_a_moved_bundled_data_file_is_named(monkeypatch, tmp_path):
    from dtrain.compat import sklearn

    monkeypatch.setattr(sklearn, "data_file", lambda name: tmp_path / name)
    with pytest.raises(CompatError, match=r"private APIs moved: sklearn/datasets/data/digits[.]csv[.]gz \(None\)"):
        sklearn.check()


def test_a_run_without_ray_datasets_starts_no_dataset_manager(monkeypatch):
    """Ray Train starts a DatasetManager actor (a process) for every run; dtrain's trainer keeps it only for runs that
    stream Ray datasets."""
    from ray.train import ScalingConfig

    from dtrain.compat import ray as ray_compat

    monkeypatch.setenv(ray_compat.V2_ENABLED_ENV, "1")
    module, _, name = ray_compat.DATASETS_CALLBACK.rpartition(".")
    datasets_callback = getattr(importlib.import_module(module), name)

    def callbacks(**datasets):
        trainer = ray_compat.torch_trainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                                           datasets=datasets or None)
        return [type(c) for c in trainer._create_default_callbacks()]

    assert datasets_callback not in callbacks()
    assert datasets_callback in callbacks(train=lambda: None)  # a dataset factory, called only when workers start
