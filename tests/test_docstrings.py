"""Every example in the package's docstrings runs and prints what it shows (doctest), so a
researcher can paste them: ``torch``, ``nn``, ``F``, ``np`` and ``graddyn`` are in scope, as
in the examples; lines marked ``# doctest: +SKIP`` are illustrations that need a run's data."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn

MODULES = sorted(m.name for m in pkgutil.walk_packages(graddyn.__path__, "graddyn.")
                 if m.name != "graddyn.__main__")  # importing it runs the CLI


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    torch.manual_seed(0)  # examples draw random inputs
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # as a user's session (the suite runs in float64)
    try:
        result = doctest.testmod(
            module, extraglobs={"torch": torch, "nn": nn, "F": F, "np": np, "graddyn": graddyn},
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
    finally:
        torch.set_default_dtype(saved)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
