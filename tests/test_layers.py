"""The layers of docs/architecture.md, checked: a package imports only from the layers below it
(module-level and function-level imports alike), so the engine never learns of a study."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "graddyn"

FOUNDATION = {"_registry", "_losses", "_kernels", "_gram", "_robust"}
# package -> the graddyn packages it may import (besides itself); docs/architecture.md, "Layers"
ALLOWED: dict[str, set[str]] = {
    "_registry": set(), "_losses": set(), "_kernels": set(),
    "_gram": {"_kernels"}, "_robust": {"_kernels"},
    "data": {"_registry"}, "models": {"_registry"},
    "pergrad": set(),
    "reference": {"pergrad", "_robust"},
    "curvature": {"pergrad"},
    "instruments": FOUNDATION,
    "train": FOUNDATION | {"pergrad", "instruments", "models"},
    "interventions": FOUNDATION | {"pergrad", "instruments", "models"},
    "influence": FOUNDATION | {"pergrad", "train"},
    "distributed": FOUNDATION | {"pergrad", "models", "data"},
    "integrations": FOUNDATION | {"pergrad", "instruments", "train"},
    "experiments": FOUNDATION | {"pergrad", "reference", "curvature", "data", "models",
                                 "instruments", "train", "interventions", "influence",
                                 "distributed"},
    "cli": {"_registry", "pergrad", "train", "experiments"},
    "__main__": {"cli"},
    "__init__": {"pergrad", "reference", "instruments", "train", "_registry"},
}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0].removesuffix(".py")


def _imported(path: Path) -> set[str]:
    """The graddyn packages that one module imports (absolute and relative imports)."""
    tree = ast.parse(path.read_text(), str(path))
    depth_of_pkg = len(path.relative_to(SRC).parts) - 1  # folders between SRC and the module
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                names = [node.module or ""]
            else:  # relative: resolve against the module's folder
                base = list(path.relative_to(SRC).parts[:depth_of_pkg])
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                mod = [*base, *(node.module.split(".") if node.module else [])]
                if not mod:  # "from . import x" at the top: x is the package
                    out.update(a.name for a in node.names)
                    continue
                names = ["graddyn." + ".".join(mod)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "graddyn" and len(parts) > 1:
                out.add(parts[1])
    return out


@pytest.mark.parametrize("path", sorted(SRC.rglob("*.py")), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path):
    pkg = _package(path)
    assert pkg in ALLOWED, f"{pkg} is not in the layer table of docs/architecture.md"
    wrong = _imported(path) - ALLOWED[pkg] - {pkg}
    assert not wrong, (f"{path.relative_to(SRC)} imports {sorted(wrong)}, above its layer; "
                       "see docs/architecture.md, 'Layers'")
