"""HessianOperator against the dense torch.func.hessian reference, in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graddyn.curvature import HessianOperator, dense_hessian


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 2 * 2, 3))


def batch(model_name: str, n: int = 12):
    x = torch.randn(n, 4) if model_name == "mlp" else torch.randn(n, 1, 6, 6)
    return x, torch.randint(0, 3, (n,))


MODES = pytest.mark.parametrize("mode", ["auto", "graph", "functional"])


@MODES
@pytest.mark.parametrize("name,make", [("mlp", mlp), ("cnn", cnn)], ids=["mlp", "cnn"])
def test_matmat_and_matvec_match_dense_hessian(name, make, mode):
    net, data = make(), batch(name)
    op = HessianOperator(net, F.cross_entropy, data, mode=mode)
    H = dense_hessian(net, F.cross_entropy, data)
    V = torch.randn(op.dim, 7)
    torch.testing.assert_close(op.matmat(V), H @ V)
    torch.testing.assert_close(op.matvec(V[:, 0]), H @ V[:, 0])
    torch.testing.assert_close(op.to_dense(), H)
    assert torch.allclose(H, H.T, atol=1e-12)


@MODES
def test_chunked_vectors_match_unchunked(mode):
    net, data = mlp(), batch("mlp")
    V = torch.randn(sum(p.numel() for p in net.parameters()), 9)
    full = HessianOperator(net, F.cross_entropy, data, mode=mode).matmat(V)
    torch.testing.assert_close(HessianOperator(net, F.cross_entropy, data, chunk_size=4,
                                               mode=mode).matmat(V), full)


@MODES
def test_parameter_subset_is_the_block_of_the_full_hessian(mode):
    net, data = mlp(), batch("mlp")
    H = dense_hessian(net, F.cross_entropy, data)
    names = [n for n, _ in net.named_parameters()]
    numels = [p.numel() for p in net.parameters()]
    start = sum(numels[:-2])  # the last layer's weight and bias come last
    for params in (["4.weight", "4.bias"], [net[4].bias, net[4].weight]):
        op = HessianOperator(net, F.cross_entropy, data, params=params, mode=mode)
        assert op.names == names[-2:]
        torch.testing.assert_close(op.to_dense(), H[start:, start:])


@MODES
@pytest.mark.parametrize("cache_batches", [0, 1, 3])
def test_average_over_batches_equals_full_batch_hessian(mode, cache_batches):
    net, (x, y) = mlp(), batch("mlp", 15)
    full = HessianOperator(net, F.cross_entropy, (x, y), mode=mode).to_dense()
    batches = list(zip(x.split(5), y.split(5)))
    kw = {"mode": mode, "cache_batches": cache_batches}
    op = HessianOperator(net, F.cross_entropy, batches, **kw)
    torch.testing.assert_close(op.to_dense(), full)
    v = torch.randn(op.dim)  # one vector per call: the graph path under "auto"
    torch.testing.assert_close(op.matvec(v), full @ v)
    assert len(op._graphs) == (3 if mode != "functional" and cache_batches >= 3 else 0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    torch.testing.assert_close(HessianOperator(net, F.cross_entropy, loader, **kw).to_dense(),
                               full)


@pytest.mark.parametrize("mode", ["auto", "graph"])
def test_cached_graph_is_rebuilt_when_the_weights_change(mode):
    net, data = mlp(), batch("mlp")
    op = HessianOperator(net, F.cross_entropy, data, mode=mode)
    v = torch.randn(op.dim)
    op.matvec(v)
    assert len(op._graphs) == 1
    cached = op._graphs[0]
    assert op.matvec(v) is not None and op._graphs[0] is cached  # reused while unchanged
    with torch.no_grad():
        net[0].weight.mul_(1.5)  # an in-place update, as an optimizer step
    torch.testing.assert_close(op.matvec(v), dense_hessian(net, F.cross_entropy, data) @ v)
    assert op._graphs[0] is not cached
    op.clear_cache()
    assert not op._graphs


def test_graph_mode_handles_a_parameter_with_zero_hessian():
    net = nn.Linear(4, 1)  # squared loss: the Hessian in the bias is constant, in x it is X^T X
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    op = HessianOperator(net, F.mse_loss, (x, y), mode="graph")
    torch.testing.assert_close(op.to_dense(), dense_hessian(net, F.mse_loss, (x, y)))
    lin = nn.Linear(4, 3, bias=False)  # a loss linear in the weights: H = 0

    def linear_loss(out, _y):
        return out.sum()

    op = HessianOperator(lin, linear_loss, (x, y), mode="graph")
    assert torch.equal(op.matmat(torch.randn(op.dim, 2)), torch.zeros(op.dim, 2))
    assert torch.equal(op.matvec(torch.randn(op.dim)), torch.zeros(op.dim))


def test_graph_mode_works_under_no_grad_and_leaves_grads_untouched():
    net, data = mlp(), batch("mlp")
    op = HessianOperator(net, F.cross_entropy, data, mode="graph")
    with torch.no_grad():
        got = op.matmat(torch.eye(op.dim)[:, :3])
    torch.testing.assert_close(got, dense_hessian(net, F.cross_entropy, data)[:, :3])
    assert all(p.grad is None for p in net.parameters())


def test_unknown_mode_and_negative_cache_are_errors():
    with pytest.raises(ValueError, match=r"mode must be one of .*'graph'"):
        HessianOperator(mlp(), F.cross_entropy, batch("mlp"), mode="fast")
    with pytest.raises(ValueError, match=r"cache_batches must be >= 0"):
        HessianOperator(mlp(), F.cross_entropy, batch("mlp"), cache_batches=-1)


def test_flatten_round_trip_and_scipy_operator():
    net, data = mlp(), batch("mlp")
    op = HessianOperator(net, F.cross_entropy, data)
    v = torch.randn(op.dim)
    assert torch.equal(op.flatten(op.unflatten(v)), v)
    assert op.unflatten(v)["0.weight"].shape == (5, 4)
    lin = op.to_scipy()
    assert lin.shape == (op.dim, op.dim)
    X = np.random.default_rng(0).standard_normal((op.dim, 3))
    np.testing.assert_allclose(lin.matmat(X), op.matmat(torch.from_numpy(X)).numpy())
    np.testing.assert_allclose(lin.matvec(X[:, 0]), op.matvec(torch.from_numpy(X[:, 0])).numpy())


def bn_net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))


@pytest.mark.parametrize("make", [bn_net, lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout())],
                         ids=["batchnorm", "dropout"])
def test_train_mode_batchnorm_or_dropout_is_refused_with_the_fix(make):
    with pytest.raises(ValueError, match=r"training mode.*model\.eval\(\).*eval_mode=True"):
        HessianOperator(make(), F.cross_entropy, batch("mlp"))


@MODES
def test_eval_mode_option_equals_hessian_of_eval_model_and_restores_mode(mode):
    net, data = bn_net(), batch("mlp")
    net(data[0])  # move running stats away from their init
    op = HessianOperator(net, F.cross_entropy, data, eval_mode=True, mode=mode)
    got = op.to_dense()
    torch.testing.assert_close(op.matvec(got[0]), got @ got[0])
    assert net.training and net[1].training
    net.eval()
    torch.testing.assert_close(got, dense_hessian(net, F.cross_entropy, data))


def test_unknown_parameter_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown parameter 'fc\.weight'.*0\.weight"):
        HessianOperator(mlp(), F.cross_entropy, batch("mlp"), params=["fc.weight"])


def test_no_trainable_parameters_is_an_error():
    net = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters selected"):
        HessianOperator(net, F.cross_entropy, batch("mlp"))


def test_empty_data_is_an_error():
    with pytest.raises(ValueError, match="data is empty"):
        HessianOperator(mlp(), F.cross_entropy, [])


def test_wrong_vector_shape_is_an_error():
    op = HessianOperator(mlp(), F.cross_entropy, batch("mlp"))
    with pytest.raises(ValueError, match=r"expected V of shape \(\d+, K\).*matvec"):
        op.matmat(torch.randn(op.dim))


def test_forward_flops_counts_linear_and_conv_layers():
    from graddyn.curvature._graph import forward_flops

    net = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 5))
    conv = 2 * (7 * 4 * 4 * 4) * (1 * 3 * 3)  # outputs x fan-in (Cin/groups * k * k)
    linear = 2 * (7 * 5) * 64
    assert forward_flops(net, torch.randn(7, 2, 6, 6)) == conv + linear


def test_auto_mode_loops_over_vectors_only_for_large_forwards(monkeypatch):
    import graddyn.curvature._operator as operator

    net, data = mlp(), batch("mlp")
    H = dense_hessian(net, F.cross_entropy, data)
    V = torch.randn(sum(p.numel() for p in net.parameters()), 4)
    op = HessianOperator(net, F.cross_entropy, data)
    torch.testing.assert_close(op.matmat(V), H @ V)
    assert not op._graphs and op._loop_choice == {0: False}  # a tiny net: vmapped jvp
    monkeypatch.setattr(operator, "LOOP_MIN_FLOPS", 0)
    op = HessianOperator(net, F.cross_entropy, data)
    torch.testing.assert_close(op.matmat(V), H @ V)
    assert len(op._graphs) == 1 and op._loop_choice == {0: True}  # the cached graph, looped
