"""Named experiments: ``EXPERIMENTS`` (name -> ``Experiment`` subclass) and the framework to
run, sweep, report and show them.

Every module ``graddyn/experiments/<name>.py`` (or package) not starting with ``_`` registers
its experiments when imported. Modules are imported when a name is first looked up in
``EXPERIMENTS``: the one that registers it (found by reading the sources, ``index()``), or all
of them for a listing; ``graddyn --help`` and ``graddyn list experiments`` import none. A
module that fails to import does not break the others: its error is kept in
``IMPORT_ERRORS`` and shown by ``graddyn list``.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from functools import lru_cache
from pathlib import Path

from graddyn.experiments._base import EXPERIMENTS, Experiment, first_sentence
from graddyn.experiments._config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    default_run_name,
    parse_overrides,
)

# module name -> "ExceptionType: message" of experiment modules that failed to import
IMPORT_ERRORS: dict[str, str] = {}
BUILT_IN = "_smoke"  # the framework's own seconds-long experiment, "smoke"

# the framework (it imports torch), loaded on first use: `from graddyn.experiments import
# run_experiment` works as before
_LAZY = {"get_experiment": "_runner", "report": "_runner", "run_experiment": "_runner",
         "show": "_runner", "SweepResult": "_sweep", "run_sweep": "_sweep"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _discover() -> None:
    _import(BUILT_IN)
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            _import(info.name)


def _import(module: str) -> None:
    try:
        importlib.import_module(f"{__name__}.{module}")
    except Exception as err:  # keep the others usable; report it in `graddyn list`
        IMPORT_ERRORS[module] = f"{type(err).__name__}: {err}"


@lru_cache(maxsize=1)
def index() -> dict[str, tuple[str, str]]:
    """name -> (module, one-line summary) of every experiment, read from the sources (the
    ``@EXPERIMENTS.register("name")`` classes and their docstrings, and the
    ``register_experiment("name", "summary", ...)`` calls) without importing them."""
    out: dict[str, tuple[str, str]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_") and info.name != BUILT_IN:
            continue
        folder = Path(info.module_finder.path)  # type: ignore[union-attr]
        path = folder / info.name / "__init__.py" if info.ispkg else folder / f"{info.name}.py"
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue  # importing it reports the problem
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for deco in node.decorator_list:
                    name = _registered_name(deco)
                    if name is not None:
                        out[name] = (info.name, first_sentence(ast.get_docstring(node) or ""))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                  and node.func.id == "register_experiment" and len(node.args) >= 2):
                name, summary = (getattr(a, "value", None) for a in node.args[:2])
                if isinstance(name, str):
                    out[name] = (info.name, first_sentence(str(summary or "")))
    return out


def _registered_name(deco: ast.expr) -> str | None:
    """``"x"`` for a decorator ``@EXPERIMENTS.register("x")``."""
    if (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)
            and deco.func.attr == "register" and isinstance(deco.func.value, ast.Name)
            and deco.func.value.id == "EXPERIMENTS" and deco.args
            and isinstance(deco.args[0], ast.Constant) and isinstance(deco.args[0].value, str)):
        return deco.args[0].value
    return None


def _load(name: str | None) -> bool:
    """``EXPERIMENTS``' loader: the module that registers ``name``, else every module."""
    found = index().get(name) if name is not None else None
    if found is not None:
        _import(found[0])
        return False
    _discover()
    return True


EXPERIMENTS.set_loader(_load)

__all__ = [
    "EXPERIMENTS", "IMPORT_ERRORS", "ConfigError", "Experiment", "SweepResult",
    "config_from_dict", "config_to_dict", "default_run_name", "get_experiment", "index",
    "parse_overrides", "report", "run_experiment", "run_sweep", "show",
]
