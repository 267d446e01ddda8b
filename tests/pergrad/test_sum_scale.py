"""``BatchGrads.sum(scale=...)``: the scaled sum (1/N: the mean gradient) without an extra
pass, equal to autograd of the scaled summed loss, for every factor layout."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn


def _models():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))  # p > q and p < q
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 16, 3))
    emb = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(5 * 4, 3))
    return [(mlp, torch.randn(5, 6)), (cnn, torch.randn(5, 1, 6, 6)),
            (emb, torch.randint(0, 7, (5, 5)))]


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("scale", [1.0, 0.2, 3.0])
def test_scaled_sum_is_autograd_of_scaled_loss(case, scale):
    model, x = _models()[case]
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (5,))
    with graddyn.capture(model) as cap:
        losses = F.cross_entropy(model(x), y, reduction="none")
    got = cap.backward(losses).sum(scale=scale)
    ref = torch.autograd.grad(scale * F.cross_entropy(model(x), y, reduction="sum"),
                              list(model.parameters()))
    for (name, _), r in zip(model.named_parameters(), ref):
        torch.testing.assert_close(got[name], r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", range(3))
def test_write_grad_adds_or_overwrites_in_place(case):
    model, x = _models()[case]
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    y = torch.randint(0, 3, (5,))
    ref = torch.autograd.grad(0.2 * F.cross_entropy(model(x), y, reduction="sum"),
                              list(model.parameters()))
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    buffers = [p.grad for p in model.parameters()]

    def grads():
        with graddyn.capture(model) as cap:
            losses = F.cross_entropy(model(x), y, reduction="none")
        return cap.backward(losses)

    grads().write_grad(scale=0.2)  # adds, like backward()
    for p, r, buf in zip(model.parameters(), ref, buffers):
        assert p.grad is buf  # updated in place, no new buffer
        torch.testing.assert_close(p.grad, r + 7.0, rtol=1e-12, atol=1e-12)
    grads().write_grad(scale=0.2, overwrite=True)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-12)
    model.zero_grad(set_to_none=True)
    grads().write_grad(scale=0.2)  # missing buffers are allocated
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-12, atol=1e-12)


def test_write_grad_overwrite_leaves_an_unused_parameter_without_gradient():
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(3, 2)}).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with graddyn.capture(model) as cap:
        losses = F.cross_entropy(model["a"](x), y, reduction="none")
    cap.backward(losses).write_grad(overwrite=True)
    assert model["b"].weight.grad is None and model["a"].weight.grad is not None
