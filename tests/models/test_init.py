"""Initialisation schemes, checked statistically."""

import math

import pytest
import torch
from torch import nn

from graddyn.models import INIT_SCHEMES, init_weights


def _var(scheme, fan_in, fan_out):
    return {
        "xavier": 2 / (fan_in + fan_out),
        "xavier-sqrt2": 4 / (fan_in + fan_out),
        "kaiming": 2 / fan_in,
        "gaussian": 2 / fan_in,
    }[scheme]


@pytest.mark.parametrize("scheme", ["xavier", "xavier-sqrt2", "kaiming", "gaussian"])
def test_linear_weight_variance(scheme):
    layer = init_weights(nn.Linear(300, 200), scheme)
    expected = _var(scheme, 300, 200)
    assert abs(float(layer.weight.detach().var()) / expected - 1) < 0.03  # 60,000 draws
    assert not layer.bias.detach().any()


@pytest.mark.parametrize("scheme", ["xavier", "kaiming"])
def test_conv_uses_receptive_field_fans(scheme):
    conv = init_weights(nn.Conv2d(16, 32, 3), scheme)
    expected = _var(scheme, 16 * 9, 32 * 9)
    assert abs(float(conv.weight.detach().var()) / expected - 1) < 0.05
    assert not conv.bias.detach().any()


def test_xavier_is_uniform_and_kaiming_gaussian():
    xav = init_weights(nn.Linear(200, 200), "xavier").weight.detach()
    bound = math.sqrt(6 / 400)
    assert float(xav.abs().max()) <= bound
    kai = init_weights(nn.Linear(200, 200), "kaiming").weight.detach()
    assert float(kai.abs().max()) > math.sqrt(3) * math.sqrt(2 / 200)  # beyond a uniform's range


@pytest.mark.parametrize("gain", [None, 2.0])
def test_orthogonal_square_layers(gain):
    layer = init_weights(nn.Linear(64, 64), "orthogonal", gain=gain)
    g = 1.0 if gain is None else gain
    w = layer.weight.detach()
    assert torch.allclose(w @ w.T, g**2 * torch.eye(64), atol=1e-10)


def test_orthogonal_rectangular_and_conv():
    # (20, 50): orthonormal rows
    wide = init_weights(nn.Linear(50, 20), "orthogonal").weight.detach()
    assert torch.allclose(wide @ wide.T, torch.eye(20), atol=1e-10)
    conv = init_weights(nn.Conv2d(8, 4, 3), "orthogonal").weight.detach().reshape(4, -1)
    assert torch.allclose(conv @ conv.T, torch.eye(4), atol=1e-10)


def test_gain_overrides_default():
    w = init_weights(nn.Linear(400, 400), "kaiming", gain=1.0).weight.detach()
    assert abs(float(w.var()) * 400 - 1) < 0.03


def test_applies_to_every_layer_and_leaves_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Sequential(nn.Linear(4, 4)))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
    init_weights(model, "orthogonal")
    for layer in (model[0], model[2][0]):
        w = layer.weight.detach()
        assert torch.allclose(w @ w.T, torch.eye(4), atol=1e-10)
    assert float(model[1].weight.detach().min()) == 3.0


def test_deterministic_under_manual_seed():
    torch.manual_seed(1)
    a = init_weights(nn.Linear(5, 5), "xavier-sqrt2").weight.detach().clone()
    torch.manual_seed(1)
    b = init_weights(nn.Linear(5, 5), "xavier-sqrt2").weight.detach()
    assert torch.equal(a, b)


def test_schemes_listed():
    assert set(INIT_SCHEMES) == {"xavier", "xavier-sqrt2", "kaiming", "gaussian", "orthogonal",
                                 "pytorch"}


def test_pytorch_scheme_keeps_the_default_init():
    torch.manual_seed(3)
    plain = nn.Linear(6, 4)
    torch.manual_seed(3)
    kept = init_weights(nn.Linear(6, 4), "pytorch")
    assert torch.equal(plain.weight, kept.weight) and torch.equal(plain.bias, kept.bias)
    assert kept.bias.abs().sum() > 0  # biases not zeroed: PyTorch's U(-1/sqrt(6), 1/sqrt(6))


def test_unknown_scheme():
    with pytest.raises(ValueError, match="valid: xavier"):
        init_weights(nn.Linear(2, 2), "glorot")
