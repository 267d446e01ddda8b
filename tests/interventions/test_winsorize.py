import numpy as np
import pytest
import torch
from torch import nn

from graddyn.interventions.winsorize import WinsorizedGradient, winsorized_gradients
from graddyn.train import per_example_cross_entropy


def model_and_batch(b: int = 12):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    return model, torch.randn(b, 5), torch.randint(0, 3, (b,))


def reference(model, x, y, c):
    """Per-example grads by a loop, then per-coordinate clipping at numpy 'nearest' percentiles."""
    params = list(model.parameters())
    rows = [torch.autograd.grad(per_example_cross_entropy(model(x[i:i + 1]), y[i:i + 1]).sum(),
                                params) for i in range(len(y))]
    b = len(y)
    q_lo, q_hi = 100 * c / (b - 1), 100 * (b - 1 - c) / (b - 1)
    out = []
    for k, p in enumerate(params):
        g = torch.stack([r[k] for r in rows]).reshape(b, -1).numpy()
        lo = np.percentile(g, q_lo, axis=0, method="nearest")
        hi = np.percentile(g, q_hi, axis=0, method="nearest")
        out.append(torch.from_numpy(np.clip(g, lo, hi).mean(0)).reshape(p.shape))
    return out


@pytest.mark.parametrize("grads_from", ["auto", "func"])
@pytest.mark.parametrize("c", [1, 2, 5])
def test_rule_matches_percentile_reference(grads_from, c):
    model, x, y = model_and_batch()
    rule = WinsorizedGradient(c, grads_from=grads_from)
    losses = rule.compute(model, x, y, per_example_cross_entropy)
    assert losses.shape == (12,) and not losses.requires_grad
    for p, ref in zip(model.parameters(), reference(model, x, y, c)):
        assert torch.allclose(p.grad, ref, atol=1e-12)


@pytest.mark.parametrize("grads_from", ["capture", "func"])
def test_reference_fallback_matches_the_reference(grads_from, monkeypatch):
    """With the compiled kernel switched off (GRADDYN_NO_KERNEL=1) both sources still agree."""
    import graddyn._kernels as switch

    monkeypatch.setattr(switch, "ENABLED", False)
    model, x, y = model_and_batch()
    WinsorizedGradient(2, grads_from=grads_from).compute(model, x, y, per_example_cross_entropy)
    for p, ref in zip(model.parameters(), reference(model, x, y, 2)):
        assert torch.allclose(p.grad, ref, atol=1e-12)


def test_c_zero_is_exactly_the_minibatch_gradient():
    model, x, y = model_and_batch()
    WinsorizedGradient(0).compute(model, x, y, per_example_cross_entropy)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    per_example_cross_entropy(model(x), y).mean().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(got, model.parameters()))


def test_gradient_rule_protocol_and_accumulation():
    model, x, y = model_and_batch()

    class Batch:
        pass

    batch = Batch()
    batch.x, batch.y = x, y
    rule = WinsorizedGradient(2)
    rule(model, per_example_cross_entropy, batch)
    once = [p.grad.clone() for p in model.parameters()]
    rule(model, per_example_cross_entropy, batch)
    assert all(torch.allclose(p.grad, 2 * g) for p, g in zip(model.parameters(), once))


def test_pure_function_chunked_equals_unchunked():
    per = {"w": torch.randn(10, 4, 6), "b": torch.randn(10, 6)}
    a = winsorized_gradients(per, 2)
    b = winsorized_gradients(per, 2, memory_budget_bytes=10 * 8 * 2 * 3)
    assert all(torch.equal(a[k], b[k]) and a[k].shape == per[k].shape[1:] for k in per)


def test_errors():
    model, x, y = model_and_batch(6)
    with pytest.raises(ValueError, match="c < B/2"):
        WinsorizedGradient(3).compute(model, x, y, per_example_cross_entropy)
    with pytest.raises(ValueError, match=">= 0"):
        WinsorizedGradient(-1)
    with pytest.raises(TypeError, match="must be an int"):
        WinsorizedGradient(0.5)
    with pytest.raises(ValueError, match="grads_from must be"):
        WinsorizedGradient(1, grads_from="magic")
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        WinsorizedGradient(1, memory_budget_bytes=0)
    with pytest.raises(ValueError, match="per-example losses"):
        WinsorizedGradient(1, grads_from="func").compute(model, x, y, nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="per-example losses"):
        WinsorizedGradient(0).compute(model, x, y, nn.functional.cross_entropy)


def test_capture_engine_missing_is_reported(monkeypatch):
    import graddyn.interventions.winsorize as W

    monkeypatch.setattr(W, "_engine", lambda: None)
    model, x, y = model_and_batch()
    with pytest.raises(RuntimeError, match="cannot be imported"):
        WinsorizedGradient(1, grads_from="capture").compute(model, x, y, per_example_cross_entropy)
    WinsorizedGradient(1).compute(model, x, y, per_example_cross_entropy)  # auto falls back
    assert model[0].weight.grad is not None
