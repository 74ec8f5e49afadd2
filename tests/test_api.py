"""The package's public surface: every module declares ``__all__``, every name in it
exists, and every name one module imports from another is in the exporter's ``__all__``
(so ``__all__`` is the whole contract between modules, and a private helper is marked by
its leading underscore). Also: the lint configuration of pyproject.toml holds.

The importers checked are the package itself, its command line, and the experiments,
benchmarks and tests that use it. The package's own imports (every one, at the top of a
file or inside a function) form no cycle and run down the layers of /work/shared's design:
cli -> train, evaluate, predict -> inference -> models, data, metrics, losses -> config ->
layers -> nothing of ours.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import unet_jax

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "unet_jax"
IMPORTERS = ("unet_jax", "experiments", "benchmarks", "tests")


def _module_names() -> list[str]:
    names = ["unet_jax"]
    for info in pkgutil.walk_packages(unet_jax.__path__, prefix="unet_jax."):
        names.append(info.name)
    return sorted(names)


MODULES = _module_names()


def _module_of(path: Path) -> str:
    """The dotted name of a file inside the package (``unet_jax/a/b.py`` -> ``unet_jax.a.b``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of every ``from unet_jax... import name`` in ``path``, relative
    imports resolved against the package the file belongs to."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_of(path) if path.is_relative_to(PACKAGE) else ""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = here.split(".") if is_package else here.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            module = ".".join(base + ([node.module] if node.module else []))
        else:
            module = node.module or ""
        if module != "unet_jax" and not module.startswith("unet_jax."):
            continue
        found += [(node.lineno, module, alias.name) for alias in node.names]
    return found


# The layers, top (imports anything below) to bottom (imports nothing of ours); a module
# belongs to the layer of its longest listed prefix. An import may stay in its layer or go
# down, never up. The package's __init__ (the lazy public API) stands above everything.
LAYERS = (
    ("unet_jax", "unet_jax.cli", "unet_jax.data.cli"),
    ("unet_jax.train", "unet_jax.evaluate", "unet_jax.predict", "unet_jax.predict_boxes"),
    ("unet_jax.inference",),
    (
        "unet_jax.models",
        "unet_jax.data",
        "unet_jax.metrics",
        "unet_jax.losses",
        "unet_jax.convert",
        "unet_jax.plots",
        "unet_jax.report",
        "unet_jax.summary",
    ),
    ("unet_jax.config",),
    ("unet_jax.layers",),
    ("unet_jax._io", "unet_jax._keys", "unet_jax.progress"),
)


def _layer(module: str) -> int:
    """The index in LAYERS of ``module`` (0: the top), by its longest listed prefix."""
    best = None
    for depth, members in enumerate(LAYERS):
        for prefix in members:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), depth)
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[1]


def _import_graph() -> dict[str, set[tuple[str, int]]]:
    """``module -> {(imported module, line)}`` of every import inside unet_jax/ (functions and
    ``TYPE_CHECKING`` blocks included), ``from a import b`` counted as importing ``a.b`` when
    that is a module."""
    files = {_module_of(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    graph: dict[str, set[tuple[str, int]]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node, module, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import unet_jax.a.b` names a.b
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add((target, node.lineno))
    return graph


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _cycles(graph: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    edges = {m: sorted({t for t, _ in targets}) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_imports_run_down_the_layers():
    problems = []
    for module, targets in sorted(_import_graph().items()):
        for target, line in sorted(targets):
            if _layer(target) < _layer(module):
                problems.append(f"{module}:{line} imports {target}, a layer above it")
    assert not problems, "\n".join(problems)


MAX_FUNCTION_LINES = 60


def test_functions_stay_short():
    """No function (or method) of the package runs over MAX_FUNCTION_LINES lines, its
    docstring and decorators included (the design: the anchors' train files run 160-440
    lines in one function; ours stay short)."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - start + 1}")
    assert not long, "functions over the limit:\n" + "\n".join(long)


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {("b", 1)}, "b": {("c", 1)}, "c": {("a", 1)}, "d": {("a", 1)}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _layer("unet_jax.inference.model") == 2 and _layer("unet_jax.data.cli") == 0


def _is_submodule(module: str, name: str) -> bool:
    """Whether ``from module import name`` imports a submodule (only packages have them)."""
    if not hasattr(importlib.import_module(module), "__path__"):
        return False
    return importlib.util.find_spec(f"{module}.{name}") is not None


@pytest.mark.parametrize("name", MODULES)
def test_module_declares_all_and_every_name_exists(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), (list, tuple)), f"{name} has no __all__"
    assert len(set(module.__all__)) == len(module.__all__), f"{name}.__all__ repeats a name"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ lists names it does not define: {missing}"


def test_imported_names_are_exported():
    files = sorted(p for folder in IMPORTERS for p in (ROOT / folder).rglob("*.py"))
    assert PACKAGE / "cli.py" in files
    problems = []
    for path in files:
        for line, module, name in _imports(path):
            if name == "*" or name.startswith("_") or _is_submodule(module, name):
                continue
            exported = getattr(importlib.import_module(module), "__all__", ())
            if name not in exported:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {name} is not in {module}.__all__")
    assert not problems, "\n".join(problems)


def test_top_level_api_resolves():
    # The lazy names (PEP 562) included: each one is imported here.
    for name in unet_jax.__all__:
        assert getattr(unet_jax, name) is not None, name
    for name in (
        "TrainConfig",
        "train_model",
        "load_checkpoint",
        "evaluate_dataset",
        "predict_files",
        "LoadedModel",
        "RunResult",
        "UNet",
        "create_model",
        "Conv2D",
    ):
        assert name in unet_jax.__all__, name
    assert sorted(dir(unet_jax)) == sorted(unet_jax.__all__)


def test_ruff_clean():
    """``ruff check`` and ``ruff format --check`` (configured in pyproject.toml) pass on the
    code and its users."""
    for command in (["check"], ["format", "--check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "ruff", *command, *IMPORTERS],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, " ".join(command) + ": " + proc.stdout + proc.stderr
