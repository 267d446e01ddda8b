"""Spectral density by stochastic Lanczos quadrature (SLQ), on :func:`lanczos_tridiag`."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from graddyn.curvature._lanczos import lanczos_tridiag
from graddyn.curvature._matmat import MatMat, Operator, as_square


def _tridiag_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    T = torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)
    return torch.linalg.eigh(T.to(torch.float64))


def slq_nodes_weights(A: Tensor | Operator | MatMat, num_steps: int = 30, num_vectors: int = 5,
                      *, dim: int | None = None,
                      generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per vector, the Gauss quadrature ``(nodes, weights)`` of the spectral measure.

    Ubaru, Chen, Saad (2017); Ghorbani, Krishnan, Xiao (2019) for Hessians. For a Rademacher
    vector ``v`` normalised to unit length, Lanczos gives ``T = U diag(theta) U^T`` and
    ``v^T f(A) v ~ sum_j tau_j f(theta_j)`` with ``tau_j = U[0, j]^2`` (weights sum to 1).
    Averaging over vectors estimates ``(1/P) tr f(A)``. Cost: ``num_steps`` mat-vecs per vector.
    """
    op = as_square(A, dim)
    out = []
    for _ in range(num_vectors):
        z = op.random_vectors(1, generator)[:, 0]
        alpha, beta, _ = lanczos_tridiag(op.matmat, z, min(num_steps, op.dim))
        theta, U = _tridiag_eigh(alpha, beta)
        out.append((theta, U[0] ** 2))
    return out


def spectral_density(A: Tensor | Operator | MatMat, num_steps: int = 30, num_vectors: int = 5,
                     *, grid: Tensor | None = None, sigma: float | None = None,
                     num_points: int = 400, dim: int | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Gaussian-smoothed eigenvalue density ``phi(t) = (1/P) sum_i N(t; lambda_i, sigma^2)``.

    Estimated by SLQ (:func:`slq_nodes_weights`), averaged over vectors; integrates to ~1.
    ``sigma`` defaults to 1% of the spectral range; ``grid`` to ``num_points`` points
    spanning the Ritz values +- 5 sigma. Returns ``(grid, density)``.

    Example:
        >>> t, phi = spectral_density(torch.diag(torch.arange(10.0)), num_steps=10)
    """
    nw = slq_nodes_weights(A, num_steps, num_vectors, dim=dim, generator=generator)
    nodes = torch.cat([n for n, _ in nw])
    weights = torch.cat([w for _, w in nw]) / len(nw)
    lo, hi = nodes.min().item(), nodes.max().item()
    if sigma is None:
        sigma = max(hi - lo, 1e-12) * 0.01
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if grid is None:
        grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points, dtype=torch.float64)
    gauss = torch.exp(-((grid[:, None] - nodes[None]) ** 2) / (2 * sigma**2))
    density = (gauss * weights[None]).sum(1) / (sigma * math.sqrt(2 * math.pi))
    return grid, density
