"""A capture kept open across steps (``rearm``): each backward equals a fresh capture's and
the per-example loop's, nothing is recorded between ``backward`` and ``rearm``, and a model
whose parameters changed is re-hooked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.pergrad import CaptureError
from graddyn.reference import per_example_grads


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,),
                                                                               generator=g)


def _ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def _assert_matches_loop(model, grads, x, y):
    ref = per_example_grads(model, lambda o, t: _ce(o, t).sum(), x, y)
    got = grads.materialize()
    for name, want in ref.items():
        torch.testing.assert_close(got[name], want, rtol=1e-10, atol=1e-12)


def test_rearmed_steps_equal_the_per_example_loop_and_keep_one_set_of_hooks():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with graddyn.capture(model) as cap:
        hooks = sum(len(m._forward_hooks) for m in model.modules())
        for step in range(4):
            if step:
                cap.rearm()
            x, y = _batch(step)
            grads = cap.backward(_ce(model(x), y))
            _assert_matches_loop(model, grads, x, y)  # at these weights
            grads.write_grad(scale=1 / 5, overwrite=True)
            opt.step()  # the next step sees new weights
            assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_nothing_is_recorded_between_backward_and_rearm():
    model = _mlp()
    x, y = _batch(0)
    with graddyn.capture(model) as cap:
        cap.backward(_ce(model(x), y))
        with graddyn.capture(model) as other:  # e.g. a probe measured between steps
            probe = other.backward(_ce(model(x[:3]), y[:3]))
        assert probe.gram().shape == (3, 3)
        assert not cap._calls  # the probe's forward was not recorded here (nor held)
        with pytest.raises(CaptureError, match="already called"):
            cap.backward(_ce(model(x), y))
        cap.rearm()
        x2, y2 = _batch(1)
        _assert_matches_loop(model, cap.backward(_ce(model(x2), y2)), x2, y2)


def test_rearm_rehooks_a_model_whose_parameters_changed():
    model = _mlp()
    x, y = _batch(0)
    with graddyn.capture(model) as cap:
        cap.backward(_ce(model(x), y))
        model[2] = nn.Linear(6, 3).double()  # a new module with new parameters
        model[0].bias.requires_grad_(False)  # and one parameter frozen
        cap.rearm()
        grads = cap.backward(_ce(model(x), y))
        assert "0.bias" not in grads.names and "2.weight" in grads.names
        got = grads.materialize()
        ref = per_example_grads(model, lambda o, t: _ce(o, t).sum(), x, y)
        for name in grads.names:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-10, atol=1e-12)


def test_rearm_needs_the_open_block():
    model = _mlp()
    x, y = _batch(0)
    with graddyn.capture(model) as cap:
        losses = _ce(model(x), y)
    cap.backward(losses)
    with pytest.raises(CaptureError, match="inside the capture's with block"):
        cap.rearm()
    with pytest.raises(CaptureError, match="entered once"):
        cap.__enter__()


def test_rearm_follows_a_module_rewrapped_with_the_same_parameters():
    model = _mlp()
    x, y = _batch(0)
    with graddyn.capture(model) as cap:
        assert "2.weight" in cap.backward(_ce(model(x), y)).names
        model[2] = nn.Sequential(model[2])  # same parameter objects, new qualified names
        cap.rearm()
        grads = cap.backward(_ce(model(x), y))
        assert "2.0.weight" in grads.names and "2.weight" not in grads.names
        _assert_matches_loop(model, grads, x, y)
