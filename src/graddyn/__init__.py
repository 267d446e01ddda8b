"""graddyn: gradient-level training dynamics for PyTorch.

The stable public API is what ``__all__`` lists. Submodules are imported lazily so that
``import graddyn`` stays cheap and a missing optional dependency of one study never breaks
another.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "capture": "graddyn.pergrad",
    "Capture": "graddyn.pergrad",
    "BatchGrads": "graddyn.pergrad",
    "UnsupportedModuleError": "graddyn.pergrad",
    "CaptureError": "graddyn.pergrad",
    "register_rule": "graddyn.pergrad",
    "Probe": "graddyn.instruments",
    "Instrument": "graddyn.instruments",
}
_SUBMODULES = {
    "pergrad", "reference", "instruments", "interventions", "curvature", "train", "data",
    "models", "experiments", "distributed", "influence", "integrations",
}

__all__ = sorted(_EXPORTS) + sorted(_SUBMODULES) + ["__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"graddyn.{name}")
    raise AttributeError(f"module 'graddyn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
