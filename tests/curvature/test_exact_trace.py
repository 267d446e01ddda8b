"""exact_trace against the trace of the dense torch.func Hessian, in float64, and its refusals."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graddyn.curvature import HessianOperator, NotPiecewiseLinearError, dense_hessian, exact_trace
from graddyn.curvature._exact import output_hessian_factor


class Residual(nn.Module):
    """x + W2 relu(W1 x): piecewise linear in every parameter despite the skip connection."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.relu(self.fc1(x)))


def relu_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def maxpool_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 2, stride=2, groups=1), nn.LeakyReLU(0.1),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def mixed_net() -> nn.Module:
    """Conv1d, grouped 'same' conv, eval BatchNorm, PReLU (by the torch.func rule), avg-pool,
    Dropout, a residual block and a Linear over a sequence (3 positions)."""
    return nn.Sequential(
        nn.Unflatten(1, (2, 6)), nn.Conv1d(2, 4, 2), nn.BatchNorm1d(4), nn.PReLU(4),
        nn.Conv1d(4, 4, 3, groups=2, padding="same"), nn.AvgPool1d(2, ceil_mode=True),
        nn.Hardtanh(), nn.Dropout(0.5), nn.Flatten(), Residual(12),
        nn.Unflatten(1, (3, 4)), nn.Linear(4, 4), nn.Flatten(), nn.Linear(12, 3))


INPUT_SHAPES = {"relu_mlp": (4,), "maxpool_cnn": (1, 8, 8), "mixed_net": (12,)}


def data(name: str, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, *INPUT_SHAPES[name]), torch.randint(0, 3, (n,))


def dense_trace(net: nn.Module, loss_fn, batch, params=None) -> float:
    return dense_hessian(net, loss_fn, batch, params).trace().item()


@pytest.mark.parametrize("make", [relu_mlp, maxpool_cnn, mixed_net],
                         ids=["relu_mlp", "maxpool_cnn", "mixed_net"])
def test_exact_trace_equals_dense_hessian_trace(make):
    net = make().eval()
    if make is mixed_net:  # running statistics away from their init
        net[2].running_mean.uniform_(-1, 1)
        net[2].running_var.uniform_(0.5, 2)
    batch = data(make.__name__)
    got = exact_trace(HessianOperator(net, F.cross_entropy, batch))
    assert got.value == pytest.approx(dense_trace(net, F.cross_entropy, batch), rel=1e-10)
    assert got.std_error == 0.0 and got.num_matvecs == 0 and got.converged


@pytest.mark.parametrize("make_loss,regression", [
    (lambda: F.mse_loss, True),
    (lambda: nn.MSELoss(reduction="sum"), True),
    (lambda: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]), label_smoothing=0.1),
     False),
], ids=["mse", "mse-sum", "ce-weighted-smoothed"])
def test_exact_trace_for_other_losses(make_loss, regression):
    net, (x, y), loss_fn = relu_mlp(), data("relu_mlp"), make_loss()
    target = torch.randn(len(x), 3) if regression else y
    got = exact_trace(HessianOperator(net, loss_fn, (x, target))).value
    assert got == pytest.approx(dense_trace(net, loss_fn, (x, target)), rel=1e-10)


def test_exact_trace_averages_batches_and_restricts_to_parameters():
    net, (x, y) = relu_mlp(), data("relu_mlp", 12)
    batches = list(zip(x.split(5), y.split(5)))  # sizes 5, 5, 2
    full = dense_trace(net, F.cross_entropy, (x, y))
    assert exact_trace(HessianOperator(net, F.cross_entropy, batches)).value == pytest.approx(
        full, rel=1e-10)
    H = dense_hessian(net, F.cross_entropy, (x, y))
    middle = ["2.weight", "2.bias"]
    start = sum(p.numel() for p in list(net.parameters())[:2])
    end = start + sum(p.numel() for p in net[2].parameters())
    block = H[start:end, start:end].trace().item()
    op = HessianOperator(net, F.cross_entropy, (x, y), params=middle)
    assert exact_trace(op).value == pytest.approx(block, rel=1e-10)


def test_last_layer_of_a_smooth_network_is_allowed():
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    batch, last = data("relu_mlp"), ["4.weight", "4.bias"]
    got = exact_trace(HessianOperator(net, F.cross_entropy, batch, params=last)).value
    assert got == pytest.approx(dense_trace(net, F.cross_entropy, batch, last), rel=1e-10)


def test_hutchinson_converges_to_the_exact_trace():
    from graddyn.curvature import hutchinson_trace

    net, batch = maxpool_cnn(), data("maxpool_cnn", 16)
    op = HessianOperator(net, F.cross_entropy, batch, mode="functional")  # one vmapped call
    est = hutchinson_trace(op, 400, batch_size=400, generator=torch.Generator().manual_seed(0))
    assert abs(est.value - exact_trace(op).value) < 4 * est.std_error


class GeluBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.fc(x))


class Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.fc(x)))[:, :3]


class Square(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return h * h


@pytest.mark.parametrize("make,msg", [
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
     r"module '1' \(Tanh\) computes TanhBackward0.*hutchinson_trace"),
    (lambda: nn.Sequential(GeluBlock(), nn.Linear(3, 3)),
     r"module '0' \(GeluBlock\) computes GeluBackward0"),
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3)),
     r"module '1' \(LayerNorm\) computes NativeLayerNormBackward0"),
    (lambda: nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 3)),
     r"module '1' \(Softplus\)"),
    (Twice, r"module 'fc' \(Linear\) multiplies .*\['fc.weight', 'fc.bias'\]"),
    (Square, r"multiplies \(MulBackward0\) .*\['fc.weight', 'fc.bias'\]"),
], ids=["tanh", "functional-gelu", "layernorm", "softplus", "layer-twice", "square"])
def test_networks_that_are_not_piecewise_linear_are_refused(make, msg):
    op = HessianOperator(make(), F.cross_entropy, data("relu_mlp"))
    with pytest.raises(NotPiecewiseLinearError, match=msg):
        exact_trace(op)


def test_training_mode_batchnorm_is_refused():
    net = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"training mode.*eval_mode=True"):
        HessianOperator(net, F.cross_entropy, data("relu_mlp"))  # the operator refuses first

    class TrainBN(nn.Module):  # batch statistics used functionally: the graph check catches it
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.batch_norm(self.fc(x), None, None, training=True)

    with pytest.raises(NotPiecewiseLinearError, match=r"'TrainBN'.*batch norm in training mode"):
        exact_trace(HessianOperator(TrainBN(), F.cross_entropy, data("relu_mlp")))


def test_loss_coupling_examples_is_refused():
    def coupled(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y) + out.mean(0).pow(2).sum()

    with pytest.raises(ValueError, match="couples the examples"):
        exact_trace(HessianOperator(relu_mlp(), coupled, data("relu_mlp")))


def test_model_returning_a_tuple_is_refused():
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(ValueError, match="returns one \\(N, ...\\) tensor, got tuple"):
        exact_trace(HessianOperator(Pair(), lambda o, y: F.cross_entropy(o[0], y),
                                    data("relu_mlp")))


def test_output_hessian_factor_reconstructs_the_softmax_hessian_and_drops_its_null_direction():
    out, y = torch.randn(5, 4), torch.randint(0, 4, (5,))
    seeds, signs = output_hessian_factor(F.cross_entropy, out, y)
    assert seeds.shape == (3, 5, 4) and bool((signs == 1).all())  # rank C - 1, PSD
    p = out.softmax(1)
    want = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]) / 5
    got = torch.einsum("jn,jna,jnb->nab", signs, seeds, seeds)
    torch.testing.assert_close(got, want)
    seeds, _ = output_hessian_factor(lambda o, _y: o.sum(), out, y)  # linear loss: H_out = 0
    assert seeds.shape == (0, 5, 4)


class ShiftBy(nn.Module):
    """Owns a parameter and takes two inputs: no closed-form rule, and vmap needs one input."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.zeros(3))

    def forward(self, a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return a + c + self.b


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.shift = nn.Linear(4, 3), ShiftBy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.shift(h, h.detach())


def test_exact_trace_needs_a_hessian_operator():
    with pytest.raises(TypeError, match="needs a HessianOperator.*hutchinson_trace"):
        exact_trace(torch.eye(3))


class FunctionalUse(nn.Module):
    """fc's weight is read in the parent's forward, fc itself is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fc.weight, self.fc.bias)


class TiedSum(nn.Module):
    """Linear in fc's parameters (a sum of two uses), but one use is outside fc's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) + F.linear(x.flip(1), self.fc.weight)


class SharedSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, :2]) + self.fc(x[:, 2:])  # linear in fc: two calls of one layer


@pytest.mark.parametrize("make", [FunctionalUse, TiedSum, SharedSum, TwoInputs,
                                  lambda: nn.Sequential(nn.Linear(4, 5), nn.ReLU(inplace=True),
                                                        nn.Linear(5, 3))],
                         ids=["functional", "tied-sum", "called-twice", "no-rule-two-inputs",
                              "inplace-relu"])
def test_reused_functional_and_ruleless_layers_are_exact(make):
    """Served by the engine: exact against the dense Hessian (they used to be refused)."""
    net, batch = make(), data("relu_mlp")
    got = exact_trace(HessianOperator(net, F.cross_entropy, batch)).value
    assert got == pytest.approx(dense_trace(net, F.cross_entropy, batch), rel=1e-10)


class ScaledOutput(nn.Module):
    """A parameter owned by the root module itself: its rule vmaps the whole forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(x)) * self.scale


def test_parameter_of_the_root_module_is_handled_by_the_vjp_rule():
    net, batch = ScaledOutput(), data("relu_mlp")
    got = exact_trace(HessianOperator(net, F.cross_entropy, batch)).value
    assert got == pytest.approx(dense_trace(net, F.cross_entropy, batch), rel=1e-10)
