"""The calibrated cost model: rates measured, saved, read back, and used by the choice."""

from __future__ import annotations

import json

import torch

import graddyn.pergrad._cost as C
from graddyn.pergrad._factors import Outer


def test_calibrate_saves_rates_that_rates_reads(tmp_path, monkeypatch):
    path = tmp_path / "cost.json"
    monkeypatch.setenv("GRADDYN_COST_FILE", str(path))
    C.rates.cache_clear()
    got = C.calibrate(shapes=((4, 3, 5, 6),))
    saved = json.loads(path.read_text())
    assert got.ghost > 0 and got.build > 0 and got.product == 1.0
    assert saved["threads"] == torch.get_num_threads() and C.rates() == got


def test_missing_or_broken_file_gives_equal_rates(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADDYN_COST_FILE", str(tmp_path / "nope.json"))
    C.rates.cache_clear()
    assert C.rates() == C.Rates()
    (tmp_path / "bad.json").write_text("{not json")
    monkeypatch.setenv("GRADDYN_COST_FILE", str(tmp_path / "bad.json"))
    C.rates.cache_clear()
    assert C.rates() == C.Rates()


def test_rates_move_the_choice(tmp_path, monkeypatch):
    """A (N, T, p, q) layer where ghost and materialised cost about the same flops: a slow
    ghost rate picks materialising, a slow build rate picks ghost."""
    f = [Outer(torch.randn(8, 1, 16, 16), torch.randn(8, 1, 16, 16), 16)]
    path = tmp_path / "cost.json"
    monkeypatch.setenv("GRADDYN_COST_FILE", str(path))
    for rates, ghost in [({"ghost": 50.0, "build": 1.0, "product": 1.0}, False),
                         ({"ghost": 1.0, "build": 50.0, "product": 1.0}, True)]:
        path.write_text(json.dumps(rates))
        C.rates.cache_clear()
        assert C.prefer_ghost(f, f, diag=False) is ghost
    C.rates.cache_clear()
