"""Shared fixtures. Tests compare fast paths to slow references in float64.

``GRADDYN_TEST_DEVICE=cuda`` (``make test-gpu``) runs the tests of ``ON_DEVICE`` with CUDA as
torch's default device, so every tensor they make is on the GPU; without a CUDA device they
are skipped. The default, ``cpu``, is ``make test``.
"""

import os
import pickle
from pathlib import Path

import pytest
import torch

DEVICE = os.environ.get("GRADDYN_TEST_DEVICE", "cpu")
ON_DEVICE = ("pergrad", "zoo", "instruments", "curvature", "influence")  # tests/<folder>


def _on_device(path: Path) -> bool:
    return Path(path).relative_to(Path(__file__).parent).parts[0] in ON_DEVICE


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cpu":
        return
    if DEVICE == "cuda" and not torch.cuda.is_available():
        why = f"GRADDYN_TEST_DEVICE=cuda but torch {torch.__version__} sees no CUDA device"
    else:
        why = f"GRADDYN_TEST_DEVICE={DEVICE} runs tests/{{{','.join(ON_DEVICE)}}} only"
    for item in items:
        if not _on_device(item.path) or "no CUDA" in why:
            item.add_marker(pytest.mark.skip(reason=why))


@pytest.fixture(autouse=True)
def _seed_and_float64(request):
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    device = DEVICE if DEVICE != "cpu" and _on_device(request.path) else None
    if device is not None:
        torch.set_default_device(device)
    yield
    if device is not None:
        torch.set_default_device(None)
    torch.set_default_dtype(old)


class _Payload:
    """Unpickling this runs code: ``__reduce__`` returns a callable and its arguments."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def code_payload(tmp_path):
    """``(make, marker)``: ``make(wrap=None)`` gives pickle bytes that create ``marker`` when
    loaded (``wrap`` puts the payload inside a container); graddyn must never run them."""
    marker = tmp_path / "payload-ran"

    def make(wrap=None):
        payload = _Payload(marker)
        return pickle.dumps(payload if wrap is None else wrap(payload), protocol=2)

    return make, marker
