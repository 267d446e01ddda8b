"""Entry points of BatchGrads and capture options against the reference loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.reference import DenseBatchGrads, per_example_grads, per_example_output_grads


def mlp():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3))


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


@pytest.fixture(params=["mlp", "cnn"])
def setup(request):
    if request.param == "mlp":
        return mlp(), torch.randn(6, 5), torch.randint(0, 3, (6,))
    return cnn(), torch.randn(6, 2, 4, 4), torch.randint(0, 3, (6,))


def test_params_subset_by_name_module_and_parameter(check):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    check(model, x, y, params=["2.weight", "0"])
    check(model, x, y, params=model[0], strategies=("auto",))
    check(model, x, y, params=[model[2].bias], strategies=("auto",))


def test_cross_gram_between_batches(setup, capture_grads):
    model, x, y = setup
    x2, y2 = torch.randn(4, *x.shape[1:]), torch.randint(0, 3, (4,))
    ga, gb = capture_grads(model, x, y), capture_grads(model, x2, y2, strategy="materialize")
    ra, rb = per_example_grads(model, ce, x, y), per_example_grads(model, ce, x2, y2)
    want = sum(ra[k].reshape(6, -1) @ rb[k].reshape(4, -1).T for k in ra)
    torch.testing.assert_close(ga.cross_gram(gb), want)
    torch.testing.assert_close(ga.cross_gram(DenseBatchGrads(rb, (4,))), want)
    per = ga.cross_gram(gb, per_layer=True)
    torch.testing.assert_close(sum(per.values()), want)
    assert set(per) == set(ra)


def test_materialize_chunked(setup, capture_grads):
    model, x, y = setup
    grads = capture_grads(model, x, y)
    full = grads.materialize()
    parts = list(grads.materialize(chunk_size=4))
    assert [p[grads.names[0]].shape[0] for p in parts] == [4, 2]
    for k in grads.names:
        torch.testing.assert_close(torch.cat([p[k] for p in parts]), full[k])


def test_grad_untouched_unless_written(setup, capture_grads):
    model, x, y = setup
    grads = capture_grads(model, x, y)
    assert all(p.grad is None for p in model.parameters())
    total = grads.sum()
    grads.write_grad()
    ce(model(x), y).sum().backward()  # accumulates on top: 2x
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * total[k])


def test_mean_reduced_loss_via_scale(setup):
    model, x, y = setup
    with graddyn.capture(model) as cap:
        losses = ce(model(x), y)
    grads = cap.backward(losses, scale=1 / x.shape[0], retain_graph=True)
    want = torch.autograd.grad(losses.mean(), list(model.parameters()))
    for g, (k, _) in zip(want, model.named_parameters()):
        torch.testing.assert_close(grads.sum()[k], g)
    ref = per_example_grads(model, ce, x, y)
    torch.testing.assert_close(grads.norms(), torch.cat(
        [v.reshape(x.shape[0], -1) for v in ref.values()], 1).norm(dim=1) / x.shape[0])


@pytest.mark.parametrize("strategy", ["auto", "ghost", "materialize"])
def test_ntk_output_mode(setup, strategy):
    model, x, _ = setup
    with graddyn.capture(model, mode="output", strategy=strategy) as cap:
        out = model(x)
    grads = cap.backward(out)
    ref = per_example_output_grads(model, x)
    b, k = out.shape
    flat = torch.cat([v.reshape(b * k, -1) for v in ref.values()], 1)
    torch.testing.assert_close(grads.ntk(), (flat @ flat.T).reshape(b, k, b, k))
    torch.testing.assert_close(grads.norms(), flat.norm(dim=1).reshape(b, k))
    mat = grads.materialize()
    for name, v in ref.items():
        torch.testing.assert_close(mat[name], v)
        torch.testing.assert_close(grads.sum()[name], v.sum(0))


def test_strategy_per_parameter(check):
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    check(model, x, y, strategies=({"0": "ghost", "2.weight": "materialize"},))


def test_fallback_custom_module(check):
    class Scale(nn.Module):  # raw nn.Parameter: no rule -> torch.func fallback
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return torch.sin(x * self.w) + self.w ** 2

    model = nn.Sequential(nn.Linear(5, 4), Scale(), nn.Linear(4, 3))
    check(model, torch.randn(6, 5), torch.randint(0, 3, (6,)))


def test_fallback_multihead_attention(check):
    class Att(nn.Module):  # MHA uses out_proj.weight functionally (never calls out_proj)
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))

    check(Att().eval(), torch.randn(3, 5, 4), torch.randint(0, 2, (3,)), strategies=("auto",))


def test_torch_func_still_works_during_and_after_capture():
    model = mlp()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xb, yb):
        return ce(torch.func.functional_call(model, p, (xb[None],)), yb[None]).sum()

    per_ex = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))
    ref = per_example_grads(model, ce, x, y)
    with graddyn.capture(model) as cap:
        inside = per_ex(params, x, y)
        losses = ce(model(x), y)
    grads = cap.backward(losses)
    after = per_ex(params, x, y)
    for k in ref:
        torch.testing.assert_close(inside[k], ref[k])
        torch.testing.assert_close(after[k], ref[k])
        torch.testing.assert_close(grads.materialize()[k], ref[k])


def test_no_grad_forward_and_unused_module_are_ignored(capture_grads):
    model = nn.ModuleDict({"used": nn.Linear(3, 2), "unused": nn.Linear(3, 2)})
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with graddyn.capture(model) as cap:
        with torch.no_grad():
            model["used"](x)
        losses = ce(model["used"](x), y)
    grads = cap.backward(losses)
    assert grads.names == ["used.weight", "used.bias", "unused.weight", "unused.bias"]
    assert torch.all(grads.materialize()["unused.weight"] == 0)
    assert torch.all(grads.gram(per_layer=True)["unused.bias"] == 0)


def test_hooks_removed_after_block():
    model = mlp()
    with graddyn.capture(model) as cap:
        losses = ce(model(torch.randn(3, 5)), torch.tensor([0, 1, 2]))
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    cap.backward(losses)
