"""The import graph of dtrain/ (read with ast, lazy imports inside functions included): layers only point down,
there is no cycle, the engine imports no launcher library, and each library's private APIs stay in its compat
module. docs/ARCHITECTURE.md draws the same layers."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "dtrain"

# Highest layer first; a module may import its own layer and the ones below it, never one above.
LAYERS = [
    ("cli", [r"dtrain\.cli", r"dtrain\.__main__"]),
    ("launch", [r"dtrain\.launch(\..*)?", r"dtrain\.report", r"dtrain\.compat\.ray"]),
    ("config/tracking", [r"dtrain\.config", r"dtrain\.tracking(\..*)?"]),
    ("engine", [r"dtrain\.engine(\..*)?", r"dtrain\.compat\.(torch|deepspeed)"]),
    ("data", [r"dtrain\.data(\..*)?", r"dtrain\.compat\.sklearn"]),
    ("models", [r"dtrain\.models(\..*)?"]),
    ("base", [r"dtrain", r"dtrain\.errors", r"dtrain\.storage", r"dtrain\.compat"]),
]
FORBIDDEN = {  # third-party libraries a layer must never import
    "engine": ("ray", "wandb", "mlflow", "tensorboard"),
    "data": ("wandb", "mlflow", "tensorboard"),
    "models": ("ray", "wandb", "mlflow", "tensorboard", "deepspeed"),
}
PRIVATE = {  # a private API of a library: only its compat module may use it
    "ray": re.compile(r"\b(_internal|_private|_do_request|_node_ip_address)\b|RAY_TRAIN_[A-Z_]+"),
    "deepspeed": re.compile(r"__compatible_ops__|\b(_global_grad_norm|clip_fp32_gradients|ds_tensor|ds_numel|"
                            r"ds_id|basic_optimizer)\b"),
    "torch": re.compile(r"torch\._foreach|\b(found_inf|_buffers|_non_persistent_buffers_set|_last_lr|"
                        r"_python_dispatch)\b"),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, root: Path = ROOT) -> set[str]:
    """Every module path.py imports, at the top or inside functions (absolute names, relative ones resolved)."""
    tree, found = ast.parse(path.read_text()), set()
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def layer_of(name: str) -> int | None:
    for rank, (_, patterns) in enumerate(LAYERS):
        if any(re.fullmatch(p, name) for p in patterns):
            return rank
    return None


def graph() -> dict[str, set[str]]:
    """{module: the dtrain modules it imports}."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_every_module_has_a_layer():
    assert [m for m in graph() if layer_of(m) is None] == []


def test_layers_only_point_down():
    upward = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {dep} ({LAYERS[layer_of(dep)][0]})"
              for m, deps in graph().items() for dep in deps if layer_of(dep) < layer_of(m)]
    assert upward == []


def test_there_is_no_import_cycle():
    edges, cycles = graph(), []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for dep in edges[node]:
            if dep in stack:
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in done:
                visit(dep, [*stack, dep], done)
        done.add(node)

    done: set[str] = set()
    for start in edges:
        if start not in done:
            visit(start, [start], done)
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    assert [c for c in cycles if not _reexport(c)] == []


def _reexport(cycle: str) -> bool:
    first, second = cycle.split(" -> ")[:2]
    return second.startswith(first + ".") or first.startswith(second + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_import_no_launcher_or_tracker_library(layer):
    rank = [name for name, _ in LAYERS].index(layer)
    bad = [f"{module_name(p)} imports {m}" for p in PACKAGE.rglob("*.py") if layer_of(module_name(p)) == rank
           for m in imports(p) if m.split(".")[0] in FORBIDDEN[layer]]
    assert bad == []


def code_words(path: Path) -> list[tuple[int, str]]:
    """(line, word) of every name, attribute, imported module and string in path's code (docstrings left out)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    words = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            words.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            words.append((node.lineno, node.attr))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            words.append((node.lineno, node.value))
        elif isinstance(node, ast.Import | ast.ImportFrom):
            words += [(node.lineno, f"{getattr(node, 'module', None) or ''}.{a.name}") for a in node.names]
        elif isinstance(node, ast.keyword) and node.arg:
            words.append((node.value.lineno, node.arg))
    return words


@pytest.mark.parametrize("library", sorted(PRIVATE))
def test_private_apis_live_in_their_compat_module(library):
    own = PACKAGE / "compat" / f"{library}.py"
    users = [f"{p.relative_to(ROOT)}:{line}: {word}" for p in PACKAGE.rglob("*.py") if p != own
             for line, word in code_words(p) if PRIVATE[library].search(word)]
    assert users == []


def test_the_checker_sees_an_upward_import(tmp_path):
    """The layer rule on a module that imports upward (as engine/worker.py once imported config and tracking)."""
    bad = tmp_path / "dtrain" / "engine" / "bad.py"
    bad.parent.mkdir(parents=True)
    bad.write_text("def f():\n    from dtrain.tracking import Tracker\n    from ..config import load_job\n")
    found = imports(bad, tmp_path)
    assert {"dtrain.tracking", "dtrain.config"} <= found
    assert all(layer_of(m) < layer_of("dtrain.engine.bad") for m in ("dtrain.tracking", "dtrain.config"))
    private = tmp_path / "use.py"
    private.write_text("def f(opt, engine):\n    opt.found_inf = None  # x\n    return engine._global_grad_norm\n")
    assert [w for _, w in code_words(private) if PRIVATE["torch"].search(w) or PRIVATE["deepspeed"].search(w)] == [
        "found_inf", "_global_grad_norm"]
