"""The package's public surface: every module declares ``__all__``, every name in it
exists, and every name one module imports from another is in the exporter's ``__all__``
(so ``__all__`` is the whole contract between modules, and a private helper is marked by
its leading underscore). Also: the lint configuration of pyproject.toml holds.

The importers checked are the package itself, its command line, and the experiments,
benchmarks and tests that use it.
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
    for name in ("TrainConfig", "train_model", "load_checkpoint", "evaluate_dataset", "predict_files",
                 "LoadedModel", "RunResult", "UNet", "create_model", "Conv2D"):
        assert name in unet_jax.__all__, name
    assert sorted(dir(unet_jax)) == sorted(unet_jax.__all__)


def test_ruff_clean():
    """``ruff check`` (configured in pyproject.toml) passes on the code and its users."""
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *IMPORTERS],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
