"""Top eigenvalues: SciPy's Lanczos (``eigsh``) and power iteration with deflation."""

from __future__ import annotations

import numpy as np
import torch
from scipy.sparse.linalg import eigsh
from torch import Tensor

from graddyn.curvature._matmat import MatMat, Operator, as_square

_WHICH = ("LA", "LM", "SA")


def top_eigenvalues(A: Tensor | Operator | MatMat, k: int = 1, *, which: str = "LA",
                    tol: float = 1e-6, maxiter: int | None = None, ncv: int | None = None,
                    dim: int | None = None, seed: int = 0,
                    return_eigenvectors: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """The ``k`` extreme eigenvalues of a symmetric ``A`` by implicitly restarted Lanczos.

    Wraps ``scipy.sparse.linalg.eigsh`` (ARPACK; Lehoucq, Sorensen, Yang 1998) on a float64
    ``LinearOperator``; the start vector is drawn from ``seed`` so results are reproducible.
    ``which``: ``"LA"`` largest algebraic (default: the sharpness of a minimum), ``"LM"``
    largest magnitude (what power iteration / PyHessian find), ``"SA"`` smallest algebraic.
    ``ncv`` (Lanczos basis size) defaults to ``max(2k+1, 8)``: the first check comes after
    ``ncv`` mat-vecs, and for a Hessian's well-separated top eigenvalue ~9 mat-vecs give ~1e-9
    relative error (PyHessian's power iteration: ~15-100 for ~1e-2). Cost: ``ncv`` mat-vecs
    per restart, one at a time. For one extreme eigenvalue to a given relative error,
    :func:`lanczos_eigenvalue` stops earlier (ARPACK's residual test is much stricter than the
    eigenvalue error it implies).

    Returns eigenvalues ``(k,)`` sorted in decreasing order (and eigenvectors ``(P, k)``).

    Example:
        >>> top_eigenvalues(torch.diag(torch.tensor([3.0, -1.0, 2.0, 0.5])), k=2).round(decimals=6)
        tensor([3., 2.], dtype=torch.float64)
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    op = as_square(A, dim)
    if not 1 <= k < op.dim:
        raise ValueError(f"k must be in [1, {op.dim - 1}] for a {op.dim}x{op.dim} operator "
                         f"(ARPACK needs k < P), got {k}; use torch.linalg.eigvalsh for all")
    if ncv is None:  # ARPACK's default is max(2k+1, 20); Hessian tops are well separated
        ncv = min(op.dim, max(2 * k + 1, 8))
    v0 = np.random.default_rng(seed).standard_normal(op.dim)
    vals, vecs = eigsh(op.to_scipy(), k=k, which=which, tol=tol, maxiter=maxiter, ncv=ncv,
                       v0=v0)
    order = np.argsort(vals)[::-1].copy()
    values = torch.from_numpy(vals[order])
    if return_eigenvectors:
        return values, torch.from_numpy(vecs[:, order])
    return values


def power_iteration(A: Tensor | Operator | MatMat, k: int = 1, *, max_iter: int = 100,
                    tol: float = 1e-4, dim: int | None = None,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` largest-magnitude eigenpairs by power iteration with deflation.

    As in PyHessian (Yao et al. 2020): ``v <- A v / ||A v||`` with ``v`` kept orthogonal to
    the eigenvectors already found, until the Rayleigh quotient changes by less than
    ``tol * |lambda|``. Slower and less accurate than :func:`top_eigenvalues`
    (convergence rate ``|lambda_2 / lambda_1|``); kept as the simple, matrix-free alternative.
    Cost: ``<= max_iter`` mat-vecs per eigenvalue.

    Returns ``(values (k,), vectors (P, k))`` in the order found.

    Example:
        >>> vals, vecs = power_iteration(torch.diag(torch.tensor([3.0, -1.0, 2.0])), k=2)
        >>> vals.round(decimals=2)
        tensor([3., 2.])
    """
    op = as_square(A, dim)
    if not 1 <= k <= op.dim:
        raise ValueError(f"k must be in [1, {op.dim}], got {k}")
    found: list[Tensor] = []
    values: list[float] = []
    for _ in range(k):
        basis = torch.stack(found, 1) if found else None
        start = torch.randn(op.dim, 1, generator=generator).to(device=op.device, dtype=op.dtype)
        lam, v = _power_one(op.matmat, basis, max_iter, tol, start)
        values.append(lam)
        found.append(v)
    return torch.tensor(values), torch.stack(found, 1)


def _power_one(matmat: MatMat, basis: Tensor | None, max_iter: int, tol: float,
               v: Tensor) -> tuple[float, Tensor]:
    def deflate(x: Tensor) -> Tensor:
        return x if basis is None else x - basis @ (basis.T @ x)

    v = deflate(v)
    v = v / v.norm()
    lam = 0.0
    for _ in range(max_iter):
        w = deflate(matmat(v))
        new = (v * w).sum().item()  # Rayleigh quotient
        if w.norm() == 0:  # A vanishes on what is left: eigenvalue 0
            return 0.0, v[:, 0]
        v = w / w.norm()
        if abs(new - lam) <= tol * abs(new):
            return new, v[:, 0]
        lam = new
    return lam, v[:, 0]
