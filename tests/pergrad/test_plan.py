"""The plan cache: the layout check runs once per model structure, and a changed structure (another
loss, another use of a parameter) gets a new plan instead of a stale one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import graddyn
import graddyn.pergrad._plan as P
from graddyn.reference import per_loss_grads


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


class Counting:
    def __init__(self, monkeypatch):
        self.n = 0
        real = P.LayoutCheck.run

        def run(layout_check, edges):
            self.n += 1
            return real(layout_check, edges)

        monkeypatch.setattr(P.LayoutCheck, "run", run)


def _gram(model, x, loss, **kw):
    with graddyn.capture(model, **kw) as cap:
        losses = loss(model(x))
    return cap.backward(losses).gram(), per_loss_grads


def _ref_gram(model, x, loss):
    g = per_loss_grads(model, loss(model(x)))
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in g.values()], 1)
    return flat @ flat.T


def test_layout_check_runs_once_per_structure(monkeypatch):
    count = Counting(monkeypatch)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    y = torch.randint(0, 3, (6,))
    for _ in range(3):  # same shapes: one analysis
        _gram(model, torch.randn(6, 5, dtype=torch.float64), lambda o: ce(o, y))
    assert count.n == 1
    y2 = torch.randint(0, 3, (7,))
    _gram(model, torch.randn(7, 5, dtype=torch.float64), lambda o: ce(o, y2))  # same pattern
    assert count.n == 1


def test_a_changed_loss_gets_a_new_plan_not_a_stale_one():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    plain = lambda o: ce(o, y)  # noqa: E731
    mixed = lambda o: ce(o, y) + ce(o, y).mean()  # noqa: E731
    for loss in (plain, mixed, plain):
        got, _ = _gram(model, x, loss)
        torch.testing.assert_close(got, _ref_gram(model, x, loss))


def test_a_parameter_used_differently_gets_a_new_plan():
    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)
            self.tied = False

        def forward(self, ids):
            h = torch.tanh(self.emb(ids).mean(1))
            return h @ self.emb.weight.T if self.tied else self.head(h)

    model = Sometimes().double()
    ids, y = torch.randint(0, 7, (5, 3)), torch.randint(0, 7, (5,))
    for tied in (False, True):
        model.tied = tied
        got, _ = _gram(model, ids, lambda o: ce(o, y))
        torch.testing.assert_close(got, _ref_gram(model, ids, lambda o: ce(o, y)))


def test_check_false_reuses_the_plan_without_walking(monkeypatch):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    _gram(model, x, lambda o: ce(o, y), check=False)
    import graddyn.pergrad._capture as C

    def boom(*a, **k):
        raise AssertionError("walked")

    monkeypatch.setattr(C, "walk", boom)
    got, _ = _gram(model, x, lambda o: ce(o, y), check=False)
    torch.testing.assert_close(got, _ref_gram(model, x, lambda o: ce(o, y)))


def test_restricting_params_keeps_the_rest_fast_and_exact(recwarn):
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.out = nn.Linear(5, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.fc(x)) + F.linear(x, self.fc.weight))

    model = Reuse().double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with graddyn.capture(model, params=["out", "fc.bias"]) as cap:
        losses = ce(model(x), y)
    got = cap.backward(losses).gram()
    g = per_loss_grads(model, ce(model(x), y), params=["out", "fc.bias"])
    flat = torch.cat([v.reshape(4, -1) for v in g.values()], 1)
    torch.testing.assert_close(got, flat @ flat.T)
    assert not [w for w in recwarn if issubclass(w.category, graddyn.pergrad.ExactPathWarning)]
