"""lanczos_eigenvalue on explicit matrices and a Hessian, against torch.linalg.eigvalsh."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graddyn.curvature import HessianOperator, lanczos_eigenvalue


def spectrum_matrix(vals: torch.Tensor) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(len(vals), len(vals)))
    return Q @ torch.diag(vals) @ Q.T


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("which,want", [("LA", 10.0), ("SA", -12.0), ("LM", -12.0)])
def test_extreme_eigenvalue_within_tolerance_and_estimate(which, want):
    A = spectrum_matrix(torch.cat([torch.tensor([10.0, -12.0]), torch.linspace(-3, 3, 198)]))
    est = lanczos_eigenvalue(A, which=which, tol=1e-8, generator=gen())
    err = abs(est.value - want)
    assert est.converged and err <= 1e-8 * abs(want)
    assert err <= est.error_estimate + 1e-12  # the estimate bounds the error at convergence
    assert est.num_matvecs < 40  # far fewer than the dimension (200)
    vals, vecs = torch.linalg.eigh(A)
    true = vecs[:, (vals - want).abs().argmin()]
    assert abs(est.vector @ true) > 1 - 1e-6  # sin^2(angle) ~ error / gap


def test_looser_tolerance_stops_earlier_with_error_near_tolerance():
    A = spectrum_matrix(torch.cat([torch.tensor([10.0, 8.0, 7.0]), torch.rand(97)]))
    loose = lanczos_eigenvalue(A, tol=1e-2, generator=gen())
    tight = lanczos_eigenvalue(A, tol=1e-10, generator=gen())
    assert loose.num_matvecs < tight.num_matvecs
    assert 0 <= 10.0 - loose.value <= 1e-2 * 10.0  # Ritz values approach from below
    assert tight.value == pytest.approx(10.0, rel=1e-10)


def test_exhausted_krylov_space_is_exact():
    est = lanczos_eigenvalue(2 * torch.eye(6), generator=gen())
    assert est.value == pytest.approx(2.0) and est.num_matvecs == 1 and est.converged


def test_unconverged_run_reports_it():
    A = spectrum_matrix(torch.linspace(1, 2, 50))  # no gap: slow convergence
    est = lanczos_eigenvalue(A, tol=1e-14, max_steps=3, generator=gen())
    assert not est.converged and est.num_matvecs == 3


def test_on_hessian_operator_matches_dense_spectrum():
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    op = HessianOperator(net, F.cross_entropy, (torch.randn(20, 4), torch.randint(0, 3, (20,))))
    exact = torch.linalg.eigvalsh(op.to_dense())
    top = lanczos_eigenvalue(op, which="LM", tol=1e-10, generator=gen())
    assert top.value == pytest.approx(exact.abs().max().item(), rel=1e-8)


def test_warm_start_near_the_eigenvector_needs_fewer_matvecs():
    """Tracking: the top eigenvector of a slightly perturbed matrix starts the next run."""
    torch.manual_seed(0)
    vals = torch.cat([torch.tensor([10.0, 7.0, 6.0]), torch.linspace(-1, 1, 197)]).double()
    A = spectrum_matrix(vals)
    before = lanczos_eigenvalue(A, tol=1e-10, generator=gen())
    E = torch.randn(200, 200, dtype=torch.float64)
    B = A + 0.02 * (E + E.T) / 2  # "a few training steps later"
    want = torch.linalg.eigvalsh(B)[-1].item()
    cold = lanczos_eigenvalue(B, tol=1e-6, generator=gen(1))
    warm = lanczos_eigenvalue(B, tol=1e-6, start=before.vector)
    assert warm.value == pytest.approx(want, rel=1e-6) and cold.value == pytest.approx(want,
                                                                                      rel=1e-6)
    assert warm.num_matvecs < cold.num_matvecs
    exact = lanczos_eigenvalue(B, tol=1e-6, start=torch.linalg.eigh(B)[1][:, -1])
    assert exact.num_matvecs == 1 and exact.value == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("kw,msg", [
    ({"which": "BE"}, "which must be one of"),
    ({"tol": 0.0}, "tol must be > 0"),
    ({"max_steps": 0}, "max_steps must be >= 1"),
    ({"start": torch.ones(4)}, "start must be a tensor of 3 numbers"),
    ({"start": torch.zeros(3)}, "finite nonzero vector"),
    ({"start": torch.tensor([1.0, float("nan"), 0.0])}, "finite nonzero vector"),
], ids=["which", "tol", "max_steps", "start-shape", "start-zero", "start-nan"])
def test_lanczos_eigenvalue_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        lanczos_eigenvalue(torch.eye(3), **kw)
