"""Trace estimators on explicit matrices: unbiased, stopping rule, Hutch++ variance."""

import pytest
import torch

from graddyn.curvature import hutchinson_trace, hutchpp_trace
from graddyn.curvature._matmat import as_square


def sym(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, n, generator=g)
    return (M + M.T) / 2 + n**0.5 * torch.eye(n)


def low_rank_dominated(n: int = 60, rank: int = 5) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(n, n))
    vals = torch.cat([torch.linspace(100, 50, rank), 0.1 * torch.rand(n - rank)])
    return Q @ torch.diag(vals) @ Q.T


def test_hutchinson_is_unbiased_within_standard_errors():
    A = sym(20)
    ests = torch.tensor([hutchinson_trace(A, 20, generator=torch.Generator().manual_seed(s))
                         .value for s in range(300)])
    se = ests.std() / len(ests) ** 0.5
    assert abs(ests.mean() - A.trace()) < 4 * se


def test_hutchinson_standard_error_matches_spread_of_estimates():
    A = sym(20)
    runs = [hutchinson_trace(A, 40, generator=torch.Generator().manual_seed(s))
            for s in range(200)]
    spread = torch.tensor([r.value for r in runs]).std()
    mean_se = torch.tensor([r.std_error for r in runs]).mean()
    assert 0.7 < (mean_se / spread).item() < 1.3


def test_hutchinson_is_exact_on_diagonal_matrices():
    est = hutchinson_trace(torch.diag(torch.arange(6.0)), 4, batch_size=3)
    assert est.value == pytest.approx(15.0) and est.num_matvecs == 4


def test_stopping_rule_fires_when_standard_error_is_small():
    A = sym(30)
    est = hutchinson_trace(A, 10_000, rtol=0.05, batch_size=5,
                           generator=torch.Generator().manual_seed(1))
    assert est.converged and est.num_matvecs < 10_000
    assert est.std_error <= 0.05 * abs(est.value)
    assert abs(est.value - A.trace().item()) < 5 * est.std_error


def test_stopping_rule_without_convergence_uses_the_whole_budget():
    est = hutchinson_trace(sym(30), 20, rtol=1e-9, generator=torch.Generator().manual_seed(1))
    assert not est.converged and est.num_matvecs == 20


def test_hutchpp_is_unbiased_and_beats_hutchinson_on_low_rank_dominated_matrix():
    A = low_rank_dominated()
    exact = A.trace().item()
    hpp = torch.tensor([hutchpp_trace(A, 30, generator=torch.Generator().manual_seed(s)).value
                        for s in range(100)])
    hut = torch.tensor([hutchinson_trace(A, 30, generator=torch.Generator().manual_seed(s))
                        .value for s in range(100)])
    assert abs(hpp.mean() - exact) < 4 * hpp.std() / 10 + 1e-9
    assert hpp.var() < 0.1 * hut.var()


def test_estimators_accept_callables_and_operators():
    A = sym(10)
    g = torch.Generator().manual_seed(3)
    by_tensor = hutchinson_trace(A, 12, generator=g).value
    by_callable = hutchinson_trace(lambda V: A @ V, 12, dim=10,
                                   generator=torch.Generator().manual_seed(3)).value
    assert by_tensor == pytest.approx(by_callable)
    assert hutchpp_trace(torch.eye(5), 15).value == pytest.approx(5.0)


@pytest.mark.parametrize("call,msg", [
    (lambda: hutchinson_trace(torch.eye(3), 1), "max_vectors must be >= 2"),
    (lambda: hutchinson_trace(torch.eye(3), 4, batch_size=0), "batch_size must be >= 1"),
    (lambda: hutchpp_trace(torch.eye(3), 5), "num_matvecs must be >= 6"),
], ids=["vectors", "batch", "hutchpp"])
def test_budget_errors(call, msg):
    with pytest.raises(ValueError, match=msg):
        call()


def test_input_errors():
    with pytest.raises(ValueError, match="expected a square matrix"):
        as_square(torch.ones(2, 3))
    with pytest.raises(ValueError, match="pass dim=P"):
        as_square(lambda V: V)
    with pytest.raises(TypeError, match="expected a Tensor, an operator"):
        as_square(3)
