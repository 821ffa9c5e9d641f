"""User code by name: `module:attr` import paths and the `dtrain.models` entry point group, checked the way the
catalog is, so that a mistake in either is one line naming the job key."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from collections.abc import Callable, Iterable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from dtrain.errors import ConfigError, first_line

ENTRY_POINT_GROUP = "dtrain.models"


def is_import_path(name: str) -> bool:
    """Whether a name is a `module:attr` import path rather than a registered name."""
    return ":" in name


def import_object(path: str, key: str) -> Any:
    """The object at `package.module:attr` (attr may be dotted), or a ConfigError naming key and what went wrong."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or ":" in attr:
        raise ConfigError(f"{key}: expected an import path module:attr (e.g. my_pkg.nets:Net), got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        missing = err.name or module_name
        hint = "" if missing != module_name.split(".")[0] else " (is its project on PYTHONPATH, or installed?)"
        raise ConfigError(f"{key}: cannot import {module_name!r}: no module named {missing!r}{hint}") from None
    except Exception as err:  # the user's module raised while importing: say where, in one line
        raise ConfigError(f"{key}: importing {module_name!r} failed: {type(err).__name__}: {first_line(err)}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def function_by_name(name: str, registry: dict[str, Any], key: str, what: str) -> Any:
    """registry[name], or the function at a `module:function` import path (what data.name and model.loss take)."""
    if name in registry:
        return registry[name]
    if not is_import_path(name):
        raise ConfigError(f"{key}: expected one of {', '.join(sorted(registry))}, or an import path module:function, "
                          f"got {name!r}")
    fn = import_object(name, key)
    if not callable(fn) or inspect.isclass(fn):
        raise ConfigError(f"{key}: expected {what} at {name}, got {type(fn).__name__}")
    return fn


def parameters(fn: Any) -> dict[str, inspect.Parameter] | None:
    """fn's parameters by name, or None when it has no signature (a builtin: the call itself judges)."""
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def check_keywords(fn: Any, names: Iterable[str], key_of: Callable[[str], str], what: str) -> None:
    """Fail on a keyword argument fn does not take, naming its job key (key_of(name)) and what fn does take."""
    params = parameters(fn)
    if params is None or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    named = [p for p, v in params.items() if v.kind not in (inspect.Parameter.VAR_POSITIONAL,
                                                            inspect.Parameter.POSITIONAL_ONLY)]
    for name in names:
        if name not in named:
            raise ConfigError(f"{key_of(name)}: {what} takes no argument {name!r} (it takes: "
                              f"{', '.join(named) or 'none'})")


def plugin_entry_points() -> dict[str, EntryPoint]:
    """Models registered by installed packages: `[project.entry-points."dtrain.models"] name = "pkg.mod:Class"`."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def model_class_at(path: str, key: str = "model.name") -> type:
    """The CatalogModel subclass at an import path, checked against the model contract."""
    from dtrain.models.base import CatalogModel

    obj = import_object(path, key)
    if not inspect.isclass(obj):
        raise ConfigError(f"{key}: {path} is a {type(obj).__name__}, expected a CatalogModel subclass "
                          "(a class whose forward(batch) returns StepOutput)")
    if not issubclass(obj, CatalogModel):
        hint = (" (a plain nn.Module trains through `model: {name: module, target: " + path + "}`)"
                if _is_module_class(obj) else "")
        raise ConfigError(f"{key}: {path} is not a dtrain.models.CatalogModel subclass{hint}")
    return obj


def _is_module_class(obj: Any) -> bool:
    from torch import nn

    return inspect.isclass(obj) and issubclass(obj, nn.Module)


@dataclasses.dataclass
class NoOptions:
    """The config of a model that declares no `Config`: its section holds only its name."""


def config_class_of(model_cls: type, name: str, key: str = "model.name") -> type:
    """The model's config dataclass by convention: its `Config` class attribute (none: no options), with a `name`
    field added when it has none, so that the model section validates exactly as a catalog model's does."""
    cfg_cls = getattr(model_cls, "Config", NoOptions)
    if not (inspect.isclass(cfg_cls) and dataclasses.is_dataclass(cfg_cls)):
        raise ConfigError(f"{key}: {name}: {model_cls.__name__}.Config must be a dataclass (its options), "
                          f"got {cfg_cls!r}")
    return _named(cfg_cls, name)


@functools.cache
def _named(cfg_cls: type, name: str) -> type:
    if any(f.name == "name" for f in dataclasses.fields(cfg_cls)):
        return cfg_cls
    named = dataclasses.make_dataclass(cfg_cls.__name__, [("name", str, dataclasses.field(default=name))],
                                       bases=(cfg_cls,))
    named.__doc__ = cfg_cls.__doc__
    return named


def describe(cls: type) -> str:
    """The first line of a class's docstring (what `dtrain models` prints beside its name)."""
    return (inspect.getdoc(cls) or "").strip().splitlines()[0] if inspect.getdoc(cls) else ""
