"""Optimum shifting: outputs unchanged, norm never grows, rank-revealing, bias modes."""

import enum
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from graddyn.interventions.optimum_shift import (
    StochasticOptimumShift,
    collect_features,
    optimum_shift,
)


def layer(fan_in: int = 16, out: int = 4) -> nn.Linear:
    return nn.Linear(fan_in, out)


def assert_outputs_kept(fc: nn.Linear, A: torch.Tensor, before: torch.Tensor) -> None:
    after = fc(A)
    assert (after - before).abs().max() <= 1e-6 * before.abs().max()


@pytest.mark.parametrize("bias", ["fixed", "augment"])
@pytest.mark.parametrize("n", [5, 16, 40], ids=["n<in", "n=in", "n>in"])
def test_outputs_unchanged_and_norm_never_grows(n, bias):
    fc, A = layer(), torch.randn(n, 16)
    before, W0 = fc(A).detach(), torch.cat([fc.weight, fc.bias[:, None]], 1).detach().clone()
    report = optimum_shift(fc, A, bias=bias)
    assert_outputs_kept(fc, A, before)
    assert report.max_rel_change <= 1e-6 and report.num_rows == n and report.bias == bias
    if bias == "fixed":
        assert report.weight_norm_after <= report.weight_norm_before + 1e-12
        assert report.weight_norm_after == pytest.approx(fc.weight.norm().item())
    else:
        W1 = torch.cat([fc.weight, fc.bias[:, None]], 1)
        assert W1.norm() <= W0.norm() + 1e-12


def test_matches_pseudoinverse_formula():
    fc, A = layer(), torch.randn(6, 16)
    expected = (torch.linalg.pinv(A) @ A @ fc.weight.detach().T).T
    report = optimum_shift(fc, A)
    torch.testing.assert_close(fc.weight.detach(), expected)
    assert report.rank == 6 and report.weight_norm_after < report.weight_norm_before


def test_identity_when_batch_exceeds_width_with_full_column_rank():
    fc, A = layer(), torch.randn(50, 16)
    W, b = fc.weight.detach().clone(), fc.bias.detach().clone()
    report = optimum_shift(fc, A)
    assert report.rank == 16
    torch.testing.assert_close(fc.weight.detach(), W)
    assert torch.equal(fc.bias.detach(), b)


@pytest.mark.parametrize("kind", ["duplicate-rows", "duplicate-columns"])
def test_rank_deficient_features(kind):
    base = torch.randn(6, 8)
    if kind == "duplicate-rows":
        A = torch.cat([base, base, base[:2]])  # (20, 8), rank 6 although n > in
    else:
        A = torch.cat([base, base], 1)[:, :16]  # (6, 16), columns repeated, rank 6
    fc = layer(A.shape[1])
    before = fc(A).detach()
    report = optimum_shift(fc, A)
    assert report.rank == 6
    assert_outputs_kept(fc, A, before)
    assert report.weight_norm_after < report.weight_norm_before


def test_augmented_bias_with_constant_feature_moves_bias():
    A = torch.cat([torch.randn(10, 3), torch.ones(10, 1)], 1)  # a constant feature
    fc = layer(4, 2)
    before = fc(A).detach()
    b0 = fc.bias.detach().clone()
    report = optimum_shift(fc, A, bias="augment")
    assert report.rank == 4  # [A, 1] has a duplicate column
    assert_outputs_kept(fc, A, before)
    assert not torch.allclose(fc.bias.detach(), b0)


def test_float32_layer_and_layer_without_bias():
    fc = nn.Linear(16, 4, bias=False).float()
    A = torch.randn(5, 16, dtype=torch.float32)
    before = fc(A).detach()
    report = optimum_shift(fc, A)
    assert fc.weight.dtype == torch.float32 and report.rank == 5
    assert (fc(A) - before).abs().max() <= 1e-5 * before.abs().max()


def test_explicit_rtol_truncates_small_singular_values():
    A = torch.randn(10, 8) @ torch.diag(torch.tensor([1.0] * 6 + [1e-4] * 2))
    assert optimum_shift(layer(8), A).rank == 8
    report = optimum_shift(layer(8), A, rtol=1e-3)
    assert report.rank == 6 and report.tol == pytest.approx(1e-3 * torch.linalg.svdvals(A)[0])


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU())
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def test_collect_features_over_batches_in_eval_mode():
    net = Net()
    xs = [torch.randn(4, 5), torch.randn(3, 5)]
    feats = collect_features(net, net.fc, [(xs[0], None), xs[1]])
    assert feats.shape == (7, 8) and net.training
    net.eval()
    torch.testing.assert_close(feats, net.body(torch.cat(xs)))
    assert collect_features(net, net.fc, xs[0]).shape == (4, 8)


def test_post_hoc_shift_keeps_model_outputs():
    net = Net().eval()
    x = torch.randn(6, 5)
    before = net(x).detach()
    optimum_shift(net.fc, collect_features(net, net.fc, x))
    assert (net(x) - before).abs().max() <= 1e-6 * before.abs().max()


class Event(enum.Enum):
    AFTER_STEP = "after_step"
    BATCH_START = "batch_start"


def make_state(step: int, net: nn.Module):
    data = torch.randn(100, 5)
    return SimpleNamespace(model=net, step=step, sample_batch=lambda n: data[:n])


def test_stochastic_os_matches_every_k_steps_and_shifts():
    net = Net()
    sos = StochasticOptimumShift("fc", every=3, batch_size=4)
    assert [sos.match(Event.AFTER_STEP, make_state(s, net)) for s in range(7)] == [
        False, False, False, True, False, False, True]
    assert not sos.match(Event.BATCH_START, make_state(3, net))
    assert sos.match("after_step", make_state(3, net))
    norm0 = net.fc.weight.norm().item()
    report = sos.apply(Event.AFTER_STEP, make_state(3, net))
    assert report.rank == 4 and net.fc.weight.norm().item() < norm0
    assert sos.reports == [(3, report)]


def test_stochastic_os_with_custom_sampler_and_layer_callable():
    net = Net()
    sos = StochasticOptimumShift(lambda m: m.fc, every=1, batch_size=2,
                                 sample=lambda state, n: (torch.randn(n, 5), None))
    assert sos.apply("after_step", SimpleNamespace(model=net, step=1)).num_rows == 2
    assert StochasticOptimumShift(net.fc, 1, 2)._resolve(net) is net.fc


def test_errors_name_the_fix():
    with pytest.raises(TypeError, match="needs an nn.Linear.*last linear layer"):
        optimum_shift(nn.Conv1d(2, 2, 1), torch.randn(3, 2))
    with pytest.raises(ValueError, match=r"shape \(n, 16\).*collect_features"):
        optimum_shift(layer(), torch.randn(3, 15))
    with pytest.raises(ValueError, match="bias must be one of"):
        optimum_shift(layer(), torch.randn(3, 16), bias="drop")
    with pytest.raises(ValueError, match="no features captured"):
        collect_features(Net(), Net().fc, [])


def test_stochastic_os_errors_name_the_fix():
    with pytest.raises(ValueError, match="every and batch_size must be >= 1"):
        StochasticOptimumShift("fc", every=0, batch_size=4)
    with pytest.raises(ValueError, match="bias must be one of"):
        StochasticOptimumShift("fc", every=1, batch_size=4, bias="x")
    net = Net()
    with pytest.raises(ValueError, match=r"no module named 'head'.*'fc'"):
        StochasticOptimumShift("head", 1, 4).apply("after_step", make_state(1, net))
    with pytest.raises(ValueError, match="no minibatch.*data=train_x or sample=lambda"):
        StochasticOptimumShift("fc", 1, 4).apply("after_step", SimpleNamespace(model=net, step=1))
    small = SimpleNamespace(model=net, step=1, batch=SimpleNamespace(x=torch.randn(2, 5)))
    with pytest.raises(ValueError, match="a minibatch of 2, need 4"):
        StochasticOptimumShift("fc", 1, 4).apply("after_step", small)
    with pytest.raises(ValueError, match="fewer than batch_size=4"):
        StochasticOptimumShift("fc", 1, 4, data=torch.randn(3, 5))


def splits(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return SimpleNamespace(train_x=x, train_y=(x[:, 0] > 0).long(), test_x=x[:8],
                           test_y=(x[:8, 0] > 0).long())


@pytest.mark.parametrize("source", ["data", "minibatch"])
def test_stochastic_os_wired_to_the_real_trainer(source):
    from graddyn.train import Event as RealEvent
    from graddyn.train import Recording, Trainer

    torch.manual_seed(0)
    net, data = Net(), splits()
    kw = {"data": data.train_x, "seed": 3} if source == "data" else {}
    sos = StochasticOptimumShift("fc", every=2, batch_size=4, **kw)
    assert sos.event == RealEvent.AFTER_STEP.value
    trainer = Trainer(
        net, torch.optim.SGD(net.parameters(), lr=0.1), data, batch_size=16, interventions=[sos],
        progress=False, recording=Recording(checkpoint=None))
    trainer.fit(6)
    assert [s for s, _ in sos.reports] == [2, 4, 6]
    assert all(r.rank == 4 and r.max_rel_change < 1e-5 for _, r in sos.reports)
    assert all(r.weight_norm_after < r.weight_norm_before for _, r in sos.reports)


def test_stochastic_os_state_dict_resumes_the_same_draws():
    net, data = Net(), torch.randn(50, 5)
    a = StochasticOptimumShift("fc", 1, 4, data=data, seed=1)
    state = SimpleNamespace(model=net, step=1)
    a._draw(state)
    saved = a.state_dict()
    nxt = a._draw(state)
    b = StochasticOptimumShift("fc", 1, 4, data=data, seed=99)
    b.load_state_dict(saved)
    assert torch.equal(b._draw(state), nxt)
