"""The Gram is computed once per BatchGrads; norms reuse its diagonal; results are copies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
import graddyn.pergrad._batchgrads as BG
import graddyn.pergrad._paramgrads as PG
from graddyn.reference import per_example_grads


def _setup():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    with graddyn.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
    return model, x, y, cap.backward(losses)


def _count_inner(monkeypatch):
    calls = {"gram": 0, "diag": 0}
    real = BG.inner

    def counting(a, b, diag=False, **kw):
        calls["diag" if diag else "gram"] += 1
        return real(a, b, diag, **kw)

    monkeypatch.setattr(BG, "inner", counting)
    return calls


def test_gram_computed_once_and_norms_from_its_diagonal(monkeypatch):
    model, x, y, grads = _setup()
    calls = _count_inner(monkeypatch)
    built = []
    real_self = BG.self_grams
    monkeypatch.setattr(BG, "self_grams",
                        lambda params, cache: built.append(1) or real_self(params, cache))
    first = grads.gram()
    again = [grads.gram(), grads.gram(per_layer=True), grads.cross_gram(grads), grads.norms(),
             grads.norms(per_layer=True)]
    assert built == [1] and calls == {"gram": 0, "diag": 0}  # once, then never again
    assert torch.equal(again[0], first) and torch.equal(again[2], first)
    assert torch.equal(sum(again[1].values()), first)
    ref = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
    flat = torch.cat([g.reshape(6, -1) for g in ref.values()], 1)
    torch.testing.assert_close(first, flat @ flat.T)
    torch.testing.assert_close(again[3], flat.norm(dim=1))


def test_norms_alone_use_the_diagonal_rule_once(monkeypatch):
    _, _, _, grads = _setup()
    calls = _count_inner(monkeypatch)
    a, b = grads.norms(), grads.norms()
    assert calls == {"gram": 0, "diag": 4} and torch.equal(a, b)


def test_results_are_copies_not_the_cache():
    _, _, _, grads = _setup()
    g = grads.gram()
    want = g.clone()
    g.zero_()
    grads.gram(per_layer=True)["0.weight"].fill_(7.0)
    torch.testing.assert_close(grads.gram(), want)
    torch.testing.assert_close(grads.norms(), want.diagonal().sqrt())


def _cnn_grads(model, n, strategy="materialize"):
    x, y = torch.randn(n, 1, 6, 6), torch.randint(0, 3, (n,))
    with graddyn.capture(model, strategy=strategy) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
    ref = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
    return cap.backward(losses), torch.cat([g.reshape(n, -1) for g in ref.values()], 1)


def _count_materialize(monkeypatch):
    calls: dict[int, int] = {}
    real = PG.ParamGrads.materialize

    def counting(self, sl=slice(None)):
        calls[id(self)] = calls.get(id(self), 0) + 1
        return real(self, sl)

    monkeypatch.setattr(PG.ParamGrads, "materialize", counting)
    return calls


def _cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


@pytest.mark.parametrize("strategy", ["auto", "materialize"])
def test_cross_gram_builds_each_sides_materialised_grads_once(monkeypatch, strategy):
    model = _cnn()
    test, h = _cnn_grads(model, 4, strategy)
    trains = [_cnn_grads(model, 5, strategy) for _ in range(3)]
    calls = _count_materialize(monkeypatch)
    for g, ref in trains:
        for _ in range(2):  # the same pair twice: both sides come from their caches
            torch.testing.assert_close(g.cross_gram(test), ref @ h.T, rtol=1e-10, atol=1e-12)
    test_ids = {id(pg) for pg in test._params.values()}
    built = {k: v for k, v in calls.items() if k in test_ids}
    assert built and all(v == 1 for v in built.values())  # test side: once, not per batch
    assert all(v == 1 for v in calls.values())
    if strategy == "materialize":
        assert len(built) == len(test_ids)


def test_flat_cache_respects_its_budget(monkeypatch):
    monkeypatch.setattr(PG, "FLAT_CACHE_BYTES", 0)
    model = _cnn()
    test, h = _cnn_grads(model, 4)
    g, ref = _cnn_grads(model, 5)
    calls = _count_materialize(monkeypatch)
    for _ in range(2):
        torch.testing.assert_close(g.cross_gram(test), ref @ h.T, rtol=1e-10, atol=1e-12)
    assert not test._flat and not g._flat and all(v == 2 for v in calls.values())


def test_linear_bias_and_weight_share_one_output_gram(monkeypatch):
    """An MLP layer's bias gradient is its weight's left factor: G G^T is multiplied once per
    layer (2 layers x 2 operands = 4 products, not 6), and the Grams stay exact."""
    model, x, y, grads = _setup()
    mms = []
    real_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__",
                        lambda a, b: mms.append(a.shape) or real_matmul(a, b))
    per_layer = grads.gram(per_layer=True)
    monkeypatch.undo()
    assert len(mms) == 4
    ref = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
    for name, g in ref.items():
        flat = g.reshape(6, -1)
        torch.testing.assert_close(per_layer[name], flat @ flat.T)
