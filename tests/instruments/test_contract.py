"""The instrument contract, generated from the registry: every registered instrument, built
with its defaults and fed probes from a real capture of a tiny MLP, computes a flat dict of
finite numbers, deterministically; ``reset`` returns its declared state to the defaults;
``state_dict`` round-trips to the same ``compute``; and where every state declares a
reduction, merging two shards equals measuring both in one."""

from __future__ import annotations

import io
import math
import types
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.instruments import INSTRUMENTS, GroupSplit, Instrument, LearnedAt, Probe


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _probes(model: nn.Module) -> list[Probe]:
    """Two probes (6 and 8 examples) of one model: every class and group has >= 2 examples."""
    out = []
    for step, b in enumerate((6, 8)):
        torch.manual_seed(10 + step)  # the default generator: on the default device too
        x = torch.randn(b, 4, dtype=torch.float64)
        y = torch.arange(b) % 3
        with graddyn.capture(model) as cap:
            logits = model(x)
            losses = F.cross_entropy(logits, y, reduction="none")
        out.append(Probe(grads=cap.backward(losses), losses=losses.detach(),
                         outputs=logits.detach(), targets=y,
                         indices=torch.arange(b) + 8 * step, step=step, model=model))
    return out


def _spectrum_args() -> dict[str, Any]:
    """Spectrum watches one output on its own fixed 1-D input set, so it has no all-default
    constructor."""
    x = torch.linspace(-3, 3, 6, dtype=torch.float64)
    return {"x": x, "target": torch.sin(2 * x), "peaks": torch.tensor([1, 2])}


CORRUPT = torch.arange(16) % 2 == 0  # (N,) group mask over the training indices the probes use
REQUIRED: dict[str, Any] = {"spectrum": _spectrum_args,
                            "group_split": lambda: {"corrupt": CORRUPT},
                            "learned_at": lambda: {"corrupt": CORRUPT}}
EMPTY_IS_DEFINED = {"margin"}  # its value before any update is documented: +inf


def _adapt(name: str, probe: Probe) -> Probe:
    """Spectrum's probe: the first logit on its inputs (x repeated over the 4 features)."""
    if name == "spectrum":
        x = _spectrum_args()["x"]
        with torch.no_grad():
            return replace(probe, outputs=probe.model(x[:, None].expand(-1, 4))[:, 0])
    return probe


def _build(name: str) -> Any:
    cls = INSTRUMENTS.get(name)
    return cls(**REQUIRED[name]()) if name in REQUIRED else cls()


def _same(a: Any, b: Any, approx: bool = False) -> bool:
    """Equal values, NaN equal to NaN (tensors, arrays, containers, numbers)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(
            _same(a[k], b[k], approx) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, approx) for x, y in zip(a, b))
    if isinstance(a, (torch.Tensor, np.ndarray)):
        a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
        if a.shape != b.shape:
            return False
        tol = {"rtol": 1e-10, "atol": 1e-12} if approx else {"rtol": 0.0, "atol": 0.0}
        return torch.allclose(a, b, equal_nan=True, **tol)
    if isinstance(a, float) or isinstance(b, float):
        if math.isnan(a) and math.isnan(b):
            return True
        return a == pytest.approx(b, rel=1e-10, abs=1e-12) if approx else a == b
    return a == b


@pytest.fixture
def probes() -> list[Probe]:
    return _probes(_mlp())


def _fed(name: str, probes: list[Probe]) -> Any:
    inst = _build(name)
    for p in probes:
        inst.update(_adapt(name, p))
    return inst


def test_a_name_is_registered_once():
    """The class statement files the instrument under its name: a second one is refused."""
    with pytest.raises(ValueError, match="registered twice"):
        types.new_class("Again", (Instrument,), {"name": "coherence"})


@pytest.mark.parametrize("name", sorted(set(INSTRUMENTS.names()) - EMPTY_IS_DEFINED))
def test_compute_before_update_says_so(name):
    with pytest.raises(RuntimeError, match="update"):
        _build(name).compute()


@pytest.mark.parametrize("name", INSTRUMENTS.names())
def test_compute_is_a_flat_dict_of_finite_numbers(name, probes):
    out = _fed(name, probes).compute()
    assert out and all(isinstance(k, str) for k in out)
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            assert torch.isfinite(value.double()).all(), key
        else:
            assert isinstance(value, (int, float)) and math.isfinite(value), key


@pytest.mark.parametrize("name", INSTRUMENTS.names())
def test_deterministic_and_reset_returns_to_the_defaults(name, probes):
    a, b = _fed(name, probes), _fed(name, probes)
    assert _same(a.compute(), b.compute())
    fresh = _build(name).state_dict()
    assert fresh.keys() == a.state_dict().keys() and fresh  # every instrument declares state
    a.reset()
    assert _same(a.state_dict(), fresh)
    for p in probes:
        a.update(_adapt(name, p))
    assert _same(a.compute(), b.compute())


@pytest.mark.parametrize("name", INSTRUMENTS.names())
def test_state_dict_round_trips(name, probes):
    inst = _fed(name, probes)
    copy = _build(name)
    copy.load_state_dict(inst.state_dict())
    assert _same(copy.compute(), inst.compute())
    with pytest.raises(KeyError, match="state_dict"):
        copy.load_state_dict({})


@pytest.mark.parametrize("name", INSTRUMENTS.names())
def test_merge_of_two_shards_equals_one_pass(name, probes):
    whole = _fed(name, probes)
    a, b = _fed(name, probes[:1]), _fed(name, probes[1:])
    if not a.mergeable:
        with pytest.raises(TypeError, match="cannot be merged"):
            a.merge(b)
        return
    a.merge(b)
    assert _same(a.compute(), whole.compute(), approx=True)


@pytest.mark.parametrize("inst", [LearnedAt(run_long=True, corrupt=CORRUPT),
                                  GroupSplit(CORRUPT, cumulative=True)],
                         ids=["learned_at", "group_split"])
def test_run_long_state_survives_a_checkpoint(inst, probes):
    """Run-long instruments declare it (the trainer never resets them) and their state loads
    from a checkpoint read with ``weights_only=True``."""
    assert inst.accumulates and not (LearnedAt() if isinstance(inst, LearnedAt) else
                                     GroupSplit(CORRUPT)).accumulates
    for p in probes:
        inst.update(p)
    buf = io.BytesIO()
    torch.save(inst.state_dict(), buf)
    buf.seek(0)
    copy = (LearnedAt(run_long=True, corrupt=CORRUPT) if isinstance(inst, LearnedAt) else
            GroupSplit(CORRUPT, cumulative=True))
    copy.load_state_dict(torch.load(buf, weights_only=True))
    assert _same(copy.compute(), inst.compute())
