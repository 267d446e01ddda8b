"""Shared fixtures. Tests compare fast paths to slow references in float64."""

import pickle

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_float64():
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
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
