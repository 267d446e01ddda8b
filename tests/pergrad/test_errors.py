"""Every error of the engine, with the message it must give."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.interventions._winsorized_mean import winsorized_mean
from graddyn.pergrad import CaptureError, UnsupportedModuleError


def mlp():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


X, Y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))


def ce(out, y=Y):
    return F.cross_entropy(out, y, reduction="none")


def test_batchnorm_train_mode():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    with pytest.raises(CaptureError, match=r"BatchNorm1d at '1'.*batch statistics.*eval"):
        with graddyn.capture(model):
            model(X)


def test_batchnorm_without_running_stats_even_in_eval():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(CaptureError, match="track_running_stats=False"):
        with graddyn.capture(model):
            model(X)


def test_scalar_loss():
    model = mlp()
    with graddyn.capture(model) as cap:
        loss = F.cross_entropy(model(X), Y)
    with pytest.raises(CaptureError, match=r"shape \(\).*reduction='none'"):
        cap.backward(loss)


def test_two_dim_loss_in_loss_mode():
    model = mlp()
    with graddyn.capture(model) as cap:
        out = model(X)
    with pytest.raises(CaptureError, match=r"shape \(6, 3\); expected \(B,\)"):
        cap.backward(out)


def test_loss_without_graph():
    model = mlp()
    with graddyn.capture(model) as cap:
        model(X)
    with pytest.raises(CaptureError, match="not built from the captured forward"):
        cap.backward(torch.ones(6, requires_grad=False))


def test_loss_from_another_forward():
    model, other = mlp(), mlp()
    with graddyn.capture(model) as cap:
        model(X)
    with pytest.raises(CaptureError, match="do not depend on any captured module output"):
        cap.backward(ce(other(X)))


def test_nothing_captured():
    model = mlp()
    losses = ce(model(X))
    with graddyn.capture(model) as cap:
        pass
    with pytest.raises(CaptureError, match="nothing captured"):
        cap.backward(losses)


def test_backward_without_with_block():
    model = mlp()
    cap = graddyn.capture(model)
    with pytest.raises(CaptureError, match="nothing captured"):
        cap.backward(ce(model(X)))


def test_backward_twice_and_reuse():
    model = mlp()
    with graddyn.capture(model) as cap:
        losses = ce(model(X))
    first = cap.backward(losses, retain_graph=True).gram()  # records kept: may run again
    torch.testing.assert_close(cap.backward(losses).gram(), first)
    with pytest.raises(CaptureError, match="already called"):
        cap.backward(losses)
    with pytest.raises(CaptureError, match="entered once"):
        with cap:
            pass


def test_unsupported_module_without_fallback():
    class Mix(nn.Module):  # a matmul with its own weight: no rule, not a broadcast
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.eye(4))

        def forward(self, x):
            return x @ self.w

    model = nn.Sequential(nn.Linear(5, 4), Mix(), nn.Linear(4, 3)).double()
    with graddyn.capture(model, fallback=False) as cap:
        losses = ce(model(X))
    msg = r"'1\.w' \(no closed-form rule for Mix\).*fallback=True"
    with pytest.raises(UnsupportedModuleError, match=msg):
        cap.backward(losses)


def test_batchnorm_mode_must_be_known():
    with pytest.raises(ValueError, match=r"batchnorm must be one of \('error', 'coupled'\)"):
        graddyn.capture(mlp(), batchnorm="eval")


def test_embedding_scale_grad_by_freq():
    model = nn.Sequential(nn.Embedding(5, 3, scale_grad_by_freq=True), nn.Flatten(),
                          nn.Linear(6, 2))
    with graddyn.capture(model) as cap:
        losses = model(torch.randint(0, 5, (4, 2))).sum(1)
    with pytest.raises(CaptureError, match="scale_grad_by_freq.*couples"):
        cap.backward(losses)


@pytest.mark.parametrize("kw, match", [
    (dict(mode="hessian"), "mode must be"),
    (dict(strategy="fast"), "not one of"),
    (dict(strategy={"nope": "ghost"}), "matches no captured parameter"),
    (dict(params=["nope"]), "Valid parameter names"),
    (dict(params=[nn.Parameter(torch.ones(2))]), "not a parameter of the model"),
])
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        graddyn.capture(mlp(), **kw)


def test_bad_loss_type():
    model = mlp()
    with graddyn.capture(model) as cap:
        model(X)
    with pytest.raises(TypeError, match="expects a tensor"):
        cap.backward([1.0])


def test_output_mode_restrictions_and_cross_gram_names():
    model = mlp()
    with graddyn.capture(model, mode="output") as cap:
        out = model(X)
    grads = cap.backward(out)
    with pytest.raises(ValueError, match="mode='loss'"):
        grads.write_grad()
    with pytest.raises(ValueError, match="mode='loss'"):
        winsorized_mean(grads, 1)
    with graddyn.capture(model, params="0") as cap:
        losses = ce(model(X))
    with pytest.raises(ValueError, match="same parameters"):
        cap.backward(losses).cross_gram(grads)
