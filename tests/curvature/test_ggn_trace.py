"""ggn_hutchinson_trace: its quadratic forms against a dense Gauss-Newton matrix (float64), its
expectation against the dense Hessian's trace, and its refusals."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

from graddyn.curvature import (
    HessianOperator,
    NotPiecewiseLinearError,
    ggn_hutchinson_trace,
    hutchinson_trace,
)
from graddyn.curvature._ggn_trace import GaussNewtonForms


def relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def maxpool_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


def data(model: nn.Module, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 1, 4, 4) if isinstance(model[0], nn.Conv2d) else (n, 4)
    return torch.randn(shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                 generator=gen)


def dense_ggn(model: nn.Module, loss_fn, batches, names: list[str]) -> torch.Tensor:
    """sum_b (n_b / N) J_b^T H_out,b J_b from torch.func Jacobians and output Hessians."""
    named = dict(model.named_parameters())
    theta = [named[k].detach() for k in names]
    total = sum(len(y) for _, y in batches)
    out = 0
    for x, y in batches:
        def f(*ps: torch.Tensor, x=x) -> torch.Tensor:
            params = {**{k: v.detach() for k, v in named.items()}, **dict(zip(names, ps))}
            return functional_call(model, params, (x,)).reshape(-1)

        J = torch.cat([j.reshape(j.shape[0], -1) for j in jacrev(f, argnums=tuple(
            range(len(theta))))(*theta)], 1)  # (N D, P)
        o = f(*theta).detach()
        H = hessian(lambda v, y=y: loss_fn(v.view(len(y), -1), y))(o)  # (N D, N D)
        out = out + (len(y) / total) * J.T @ H @ J
    return out


@pytest.mark.parametrize("per_layer", [True, False])
@pytest.mark.parametrize("build", [relu_mlp, maxpool_cnn])
@pytest.mark.parametrize("params", [None, "last"])
def test_forms_equal_dense_gauss_newton(build, params, per_layer) -> None:
    torch.manual_seed(0)
    model = build().double()
    batches = [data(model, 7, 1), data(model, 4, 2)]
    names = [n for n, _ in model.named_parameters()]
    if params == "last":
        names = names[-2:]
    op = HessianOperator(model, F.cross_entropy, batches, params=names)
    G = dense_ggn(model, F.cross_entropy, batches, names)
    Z = torch.randn(op.dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(GaussNewtonForms(op, per_layer)(Z), (Z * (G @ Z)).sum(0), rtol=1e-10,
                               atol=1e-12)
    # the identity the estimator rests on: tr(G) = tr(H) for a piecewise-linear net
    torch.testing.assert_close(torch.trace(G), torch.trace(op.to_dense()), rtol=1e-10, atol=1e-12)


def test_estimate_within_its_standard_error_and_less_noisy_than_hvp_vectors() -> None:
    torch.manual_seed(1)
    model = relu_mlp().double()
    op = HessianOperator(model, F.cross_entropy, data(model, 32, 4))
    exact = torch.trace(op.to_dense()).item()
    ggn = ggn_hutchinson_trace(op, 2000, batch_size=250, generator=torch.Generator().manual_seed(0))
    hvp = hutchinson_trace(op, 2000, batch_size=250, generator=torch.Generator().manual_seed(0))
    assert abs(ggn.value - exact) < 4 * ggn.std_error
    assert ggn.num_matvecs == 2000 and ggn.std_error < hvp.std_error


def test_stopping_rule() -> None:
    torch.manual_seed(2)
    model = relu_mlp().double()
    op = HessianOperator(model, F.cross_entropy, data(model, 16, 5))
    est = ggn_hutchinson_trace(op, 5000, batch_size=20, rtol=0.05, min_vectors=20)
    assert est.converged and est.num_matvecs < 5000 and est.std_error <= 0.05 * abs(est.value)


def test_refuses_smooth_networks() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    op = HessianOperator(model, F.cross_entropy, data(relu_mlp(), 6, 0))
    with pytest.raises(NotPiecewiseLinearError, match="'1' \\(Tanh\\)|Tanh"):
        ggn_hutchinson_trace(op, 10)
    last = HessianOperator(model, F.cross_entropy, data(relu_mlp(), 6, 0),
                           params=["2.weight", "2.bias"])
    assert ggn_hutchinson_trace(last, 10).num_matvecs == 10  # the last layer always qualifies


def test_needs_a_hessian_operator() -> None:
    with pytest.raises(TypeError, match="HessianOperator"):
        ggn_hutchinson_trace(torch.eye(3), 10)


class FunctionalUse(nn.Module):
    """fc.weight also used outside fc's call: the per-layer set-up does not apply (it falls
    back to a full Jacobian-vector product), yet the net is piecewise linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.fc(x)) + F.linear(x, self.fc.weight))


def test_falls_back_to_full_jvp_when_a_layer_rule_does_not_apply() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    shared = nn.Sequential(model[0], nn.ReLU(), model[0], nn.ReLU(), model[2])  # applied twice
    op = HessianOperator(shared, F.cross_entropy, data(relu_mlp(), 5, 1))
    with pytest.raises(NotPiecewiseLinearError):  # a layer applied twice is not multilinear
        ggn_hutchinson_trace(op, 10)
    x, y = data(relu_mlp(), 6, 2)
    op = HessianOperator(FunctionalUse().double(), F.cross_entropy, (x, y))
    forms = GaussNewtonForms(op)
    Z = torch.randn(op.dim, 3, dtype=torch.float64)
    got = forms(Z)
    assert isinstance(forms._setup[0], tuple)  # (seeds, signs): the full-JVP set-up
    names = [n for n, _ in op.model.named_parameters()]
    G = dense_ggn(op.model, F.cross_entropy, [(x, y)], names)
    torch.testing.assert_close(got, (Z * (G @ Z)).sum(0), rtol=1e-10, atol=1e-12)


def mixed_layers() -> nn.Module:
    """A grouped conv, eval BatchNorm and PReLU: layers whose own tangent comes from the
    vmapped jvp path, not the Linear/Conv shortcut."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2),
                         nn.BatchNorm2d(4), nn.PReLU(4), nn.Flatten(), nn.Linear(16, 3)).eval()


def test_forms_on_layers_without_the_affine_shortcut() -> None:
    torch.manual_seed(4)
    model = mixed_layers().double()
    model[3].running_mean.uniform_(-0.5, 0.5)
    model[3].running_var.uniform_(0.5, 2.0)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=gen)
    op = HessianOperator(model, F.cross_entropy, (x, y))
    names = [n for n, _ in model.named_parameters()]
    G = dense_ggn(model, F.cross_entropy, [(x, y)], names)
    forms = GaussNewtonForms(op)
    Z = torch.randn(op.dim, 4, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(forms(Z), (Z * (G @ Z)).sum(0), rtol=1e-10, atol=1e-12)
    assert not isinstance(forms._setup[0], tuple)  # the per-layer set-up was used
