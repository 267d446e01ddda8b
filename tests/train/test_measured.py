"""Instruments on the training minibatch (``Probes(batch_instruments=...)``) and the step's
own captured backward (``measured_backward``): the gradient is the plain mean gradient, the
trajectory is unchanged, and the measurements are those of the batch at the pre-update weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graddyn.instruments import BatchCoherence, Confusion, Stiffness
from graddyn.instruments.coherence import coherence_from_gram
from graddyn.reference import per_example_grads
from graddyn.train import MeanLoss, Probes, Recording, Trainer, at, every, measured_backward


def _data(n=40, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return SimpleNamespace(train_x=x, train_y=y)


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).double()


def _loss(out, y):
    return F.cross_entropy(out, y, reduction="none")


def test_measured_backward_is_the_mean_gradient_and_accumulates():
    model, data = _model(), _data()
    x, y = data.train_x[:8], data.train_y[:8]
    losses, grads, outputs = measured_backward(model, _loss, x, y)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _loss(model(x), y).mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-12, atol=1e-14)
    measured_backward(model, _loss, x, y)  # adds, like backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2 * got[n], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(losses, _loss(model(x), y).detach())
    assert outputs.shape == (8, 3) and grads.gram().shape == (8, 8)


def test_batch_instruments_leave_the_trajectory_unchanged_and_measure_each_batch():
    data = _data()
    plain_model = _model()
    plain = Trainer(
        plain_model, torch.optim.SGD(plain_model.parameters(), lr=0.1), data, batch_size=8,
        progress=False, recording=Recording(checkpoint=None))
    model = _model()
    measured = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data, batch_size=8, progress=False,
        probes=Probes(batch_instruments=[(BatchCoherence(), every(1)),
                                          (Confusion(), at([2])),
                                          (Stiffness(num_classes=3), every(2))]),
        recording=Recording(checkpoint=None))
    plain.fit(6)
    first_batch_weights = {k: v.clone() for k, v in model.state_dict().items()}
    measured.fit(6)
    for a, b in zip(plain_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    hist: dict[str, list[int]] = {}
    values: dict[tuple[str, int], float] = {}
    for step, name, value in measured.history:
        hist.setdefault(name, []).append(step)
        values[(name, step)] = value
    assert hist["batch_coherence/alpha"] == [1, 2, 3, 4, 5, 6]
    assert hist["confusion/eta"] == [2] and hist["stiffness/cosine"] == [2, 4, 6]
    # step 1 measured the first training batch at the initial weights (reference loop)
    check = _model()
    check.load_state_dict(first_batch_weights)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    idx = perm[:8]
    ref = per_example_grads(check, _loss, data.train_x[idx], data.train_y[idx])
    flat = torch.cat([g.reshape(8, -1) for g in ref.values()], 1)
    want = coherence_from_gram(flat @ flat.T)["alpha"]
    assert values[("batch_coherence/alpha", 1)] == pytest.approx(want, rel=1e-10)


def test_batch_instruments_refuse_a_custom_rule_and_name_clashes():
    model, data = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    class Doubled:
        def __call__(self, model, loss_fn, batch):
            return MeanLoss()(model, lambda o, t: 2 * loss_fn(o, t), batch)

    with pytest.raises(ValueError, match="cannot be combined with gradient=Doubled"):
        Trainer(
            model, opt, data, batch_size=8, gradient=Doubled(),
            probes=Probes(batch_instruments=[(BatchCoherence(), every(1))]))
    with pytest.raises(ValueError, match="both probe and batch instruments"):
        Trainer(
            model, opt, data, batch_size=8,
            probes=Probes([(Confusion(), every(1))], batch_instruments=[(Confusion(), every(1))]))


def test_measured_and_plain_steps_mix_without_changing_the_trajectory():
    """Batch instruments due on some steps only: measured steps overwrite last step's p.grad
    in place, plain steps start from None; the trajectory is still plain SGD's."""
    data = _data()
    plain_model, model = _model(), _model()
    plain = Trainer(
        plain_model,
        torch.optim.SGD(plain_model.parameters(), lr=0.1,
                                                 momentum=0.9, weight_decay=1e-3),
        data, batch_size=8, progress=False, recording=Recording(checkpoint=None))
    mixed = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                                           weight_decay=1e-3),
        data, batch_size=8, progress=False,
        probes=Probes(batch_instruments=[(Confusion(), at([2, 3, 6]))]),
        recording=Recording(checkpoint=None))
    plain.fit(7)
    mixed.fit(7)
    for a, b in zip(plain_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert [s for s, name, _ in mixed.history if name == "confusion/eta"] == [2, 3, 6]


def test_one_capture_serves_the_fit_and_follows_a_replaced_layer():
    """The trainer keeps one capture open for the whole fit (rearmed per measured step); an
    intervention that swaps in a new last layer mid-run is picked up (its parameters get
    gradients), and no hook is left on the model afterwards."""
    from graddyn.train import Event

    class SwapLastLayer:
        def match(self, event, st):
            return event is Event.BATCH_START and st.step == 3

        def apply(self, event, st):
            torch.manual_seed(5)
            st.model[2] = nn.Linear(7, 3).double()
            st.optimizer.param_groups[0]["params"][-2:] = list(st.model[2].parameters())

    def run(measure: bool):
        model = _model()
        kw = {"probes": Probes(batch_instruments=[(Confusion(), every(1))])} if measure else {}
        tr = Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), batch_size=8,
            progress=False, interventions=[SwapLastLayer()], **kw,
            recording=Recording(checkpoint=None))
        tr.fit(6)
        return model

    plain, measured = run(False), run(True)
    for a, b in zip(plain.parameters(), measured.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in measured.modules())
