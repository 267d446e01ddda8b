"""graddyn.register_rule: a user's layer gets the fast path; wrong registrations are refused."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import graddyn
from graddyn.pergrad import ExactPathWarning
from graddyn.pergrad._rules import RULES
from graddyn.reference import per_loss_grads


class Gain(nn.Module):
    """y = x @ diag(w): multiplies by its own weight in a way book-keeping cannot split
    (a matmul sums over the examples inside the node)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x @ torch.diag(self.w)


@pytest.fixture
def gain_rule():
    def rule(module, call):
        return [("w", (call.grad * call.args[0]).reshape(len(call.grad), -1,
                                                        call.grad.shape[-1]).sum(1))]

    graddyn.register_rule(Gain, rule, batch="leading")
    yield rule
    RULES.pop(Gain, None)


def _run(model, x):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExactPathWarning)
        with graddyn.capture(model) as cap:
            losses = model(x).square().sum((1, 2))
        grads = cap.backward(losses)
    ref = per_loss_grads(model, model(x).square().sum((1, 2)))
    flat = torch.cat([g.reshape(len(x), -1) for g in ref.values()], 1)
    torch.testing.assert_close(grads.gram(), flat @ flat.T)
    return [w for w in caught if issubclass(w.category, ExactPathWarning)]


def test_a_registered_rule_takes_the_fast_path_in_any_layout(gain_rule):
    model = nn.Sequential(nn.Linear(3, 4), Gain(4)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    assert _run(model, x) == []
    assert _run(model, x.transpose(0, 1).contiguous()) == []  # examples in dim 1


def test_without_the_rule_it_is_exact_and_named():
    model = nn.Sequential(nn.Linear(3, 4), Gain(4)).double()
    warned = _run(model, torch.randn(5, 2, 3, dtype=torch.float64))
    assert len(warned) == 1 and "'1.w' (no closed-form rule for Gain)" in str(warned[0].message)


def test_a_subclass_is_not_served_by_its_parents_rule(gain_rule):
    class Sub(Gain):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(3, 4), Sub(4)).double()
    assert len(_run(model, torch.randn(5, 2, 3, dtype=torch.float64))) == 1


def test_bad_registrations_are_refused():
    with pytest.raises(TypeError, match="needs an nn.Module subclass"):
        graddyn.register_rule(int, lambda m, c: [])
    with pytest.raises(ValueError, match="batch must be 'first', 'leading'"):
        graddyn.register_rule(Gain, lambda m, c: [], batch="middle")
    assert Gain not in RULES
