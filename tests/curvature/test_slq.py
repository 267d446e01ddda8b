"""The hand-written Lanczos tridiagonalisation and SLQ on explicit matrices."""

import pytest
import torch

from graddyn.curvature import lanczos_tridiag, slq_nodes_weights, spectral_density


def sym(n: int) -> torch.Tensor:
    M = torch.randn(n, n)
    return (M + M.T) / 2


def test_full_lanczos_recovers_spectrum_and_is_orthonormal():
    A = sym(15)
    alpha, beta, Q = lanczos_tridiag(lambda V: A @ V, torch.randn(15), 15)
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    torch.testing.assert_close(Q.T @ Q, torch.eye(15))
    torch.testing.assert_close(Q.T @ A @ Q, T)
    torch.testing.assert_close(torch.linalg.eigvalsh(T), torch.linalg.eigvalsh(A))


def test_lanczos_stops_when_krylov_space_is_exhausted():
    alpha, beta, Q = lanczos_tridiag(lambda V: 2 * V, torch.randn(6), 6)
    assert alpha.tolist() == pytest.approx([2.0]) and len(beta) == 0 and Q.shape == (6, 1)


def test_slq_weights_sum_to_one_and_estimate_the_trace():
    A = sym(12)
    nw = slq_nodes_weights(A, num_steps=12, num_vectors=50,
                           generator=torch.Generator().manual_seed(0))
    for _, weights in nw:
        assert weights.sum().item() == pytest.approx(1.0)
    # With Rademacher vectors, n * sum_j tau_j theta_j = z^T A z, Hutchinson's sample.
    est = torch.tensor([12 * (w * n).sum() for n, w in nw])
    assert abs(est.mean() - A.trace()) < 4 * est.std() / 50**0.5


def test_spectral_density_integrates_to_one_and_peaks_at_eigenvalues():
    A = torch.diag(torch.tensor([0.0, 0.0, 5.0, 5.0]))
    t, phi = spectral_density(A, num_steps=4, num_vectors=3, sigma=0.2)
    assert torch.trapezoid(phi, t).item() == pytest.approx(1.0, abs=1e-3)
    assert phi[(t - 5.0).abs().argmin()] > 10 * phi[(t - 2.5).abs().argmin()]


def test_spectral_density_rejects_nonpositive_sigma():
    with pytest.raises(ValueError, match="sigma must be positive"):
        spectral_density(torch.eye(3), num_steps=3, sigma=-1.0)
