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
