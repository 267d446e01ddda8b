"""Lanczos with full reorthogonalisation, one mat-vec at a time, and the extreme eigenvalue
it finds with a stopping rule on the Ritz residual.

SciPy does not expose a Lanczos tridiagonalisation, and ARPACK (``eigsh``) checks convergence
only after a full basis of ``ncv`` mat-vecs with a residual test (``||A x - theta x|| <= tol
|theta|``) that is much stricter than the eigenvalue error it implies (``~ residual^2 / gap``);
so :func:`lanczos_eigenvalue` runs its own loop and stops after the first step whose estimated
eigenvalue error is below ``tol``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from graddyn.curvature._matmat import MatMat, Operator, as_square

_WHICH = ("LA", "SA", "LM")


def lanczos_steps(matmat: MatMat, v0: Tensor, max_steps: int
                  ) -> Iterator[tuple[list[float], list[float], Tensor]]:
    """Yield ``(alpha, beta, Q)`` after each of up to ``max_steps`` mat-vecs.

    After step ``m``: ``alpha`` (m,) and ``beta[:m-1]`` define ``T_m = Q_m^T A Q_m``, and
    ``beta[m-1]`` is the norm of the new residual ``A q_m - Q_m T_m e_m`` (``0`` once the
    Krylov space is exhausted, which ends the iteration). ``Q`` holds the orthonormal basis
    as rows, ``(m + 1, P)`` while the iteration goes on (the last row is the next vector).
    Full reorthogonalisation against all of ``Q``, repeated when it cancelled most of ``w``
    (the DGKS test; twice is enough, Giraud et al. 2005): ``O(P m)`` extra per step, safe in
    float32 for the few tens of steps used here.
    """
    buf = torch.empty(min(max_steps + 1, 8), v0.shape[0], dtype=v0.dtype, device=v0.device)
    buf[0] = v0 / v0.norm()
    alpha: list[float] = []
    beta: list[float] = []
    for m in range(1, max_steps + 1):
        Q, q = buf[:m], buf[m - 1]  # (m, P) basis so far, (P,) newest vector
        w = matmat(q[:, None])[:, 0]  # (P,)
        alpha.append((q @ w).item())
        w = w - alpha[-1] * q - (beta[-1] * buf[m - 2] if beta else 0.0)  # 3-term recurrence
        before = w.norm().item()
        w = w - (Q @ w) @ Q  # what rounding left along the basis
        b = w.norm().item()
        if b < 0.7 * before:  # cancellation: one more pass restores orthogonality
            w = w - (Q @ w) @ Q
            b = w.norm().item()
        exhausted = b <= 1e-10 * max(1.0, abs(alpha[-1]))
        beta.append(0.0 if exhausted else b)
        if not exhausted:
            if m == len(buf):  # grow by doubling: no copy of the basis at every step
                buf = torch.cat([buf, torch.empty_like(buf)])[: max_steps + 1]
            buf[m] = w / b
        yield alpha, beta, buf[: m + (not exhausted)]
        if exhausted:
            return


def lanczos_tridiag(matmat: MatMat, v0: Tensor, num_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos: orthonormal ``Q (P, m)`` and tridiagonal ``T = Q^T A Q`` from start ``v0``.

    Returns ``(alpha (m,), beta (m-1,), Q)``; stops early (smaller ``m``) if the Krylov space
    is exhausted. Cost: ``m`` mat-vecs, one at a time.
    """
    last = deque(lanczos_steps(matmat, v0, num_steps), maxlen=1)  # the final state
    alpha, beta, Q = last[0] if last else ([], [], (v0 / v0.norm())[None])
    m = len(alpha)
    return torch.tensor(alpha), torch.tensor(beta[: max(m - 1, 0)]), Q[: max(m, 1)].T


@dataclass(frozen=True)
class EigenEstimate:
    """An extreme eigenvalue from Lanczos.

    value: the Ritz value.  error_estimate: ``min(r, r^2 / gap)`` with ``r`` the Ritz residual
    norm and ``gap`` the distance to the nearest other Ritz value (a bound on the distance to
    the nearest eigenvalue, assuming the Ritz values have found the spectrum's other end).
    vector: the unit Ritz vector ``(P,)``.  num_matvecs: mat-vecs spent.  converged:
    ``error_estimate <= tol * |value|`` was met.
    """

    value: float
    error_estimate: float
    vector: Tensor
    num_matvecs: int
    converged: bool

    def __float__(self) -> float:
        return self.value


def lanczos_eigenvalue(A: Tensor | Operator | MatMat, *, which: str = "LA", tol: float = 1e-3,
                       max_steps: int = 100, dim: int | None = None,
                       generator: torch.Generator | None = None,
                       start: Tensor | None = None) -> EigenEstimate:
    """The largest (``"LA"``), smallest (``"SA"``) or largest-magnitude (``"LM"``) eigenvalue of
    a symmetric ``A`` by Lanczos, stopping as soon as its estimated relative error is ``<= tol``.

    After each mat-vec the tridiagonal ``T_m`` is diagonalised (``m x m``, free next to a
    mat-vec); the wanted Ritz value ``theta`` has residual ``r = beta_m |s_m|`` (last entry of
    its eigenvector of ``T_m``), and ``|lambda - theta| <= r^2 / gap`` (Parlett 1998, Thm
    11.7.1) with the gap to the rest of the spectrum estimated by the other Ritz values.
    Against power iteration (PyHessian), whose error after ``m`` mat-vecs decays like
    ``(lambda_2/lambda_1)^(2m)``, Lanczos converges like a Chebyshev polynomial of degree ``m``:
    for the MNIST nets of ``benchmarks/curvature.py`` (9 outlier eigenvalues, ``lambda_2 /
    lambda_1 ~ 0.66``) 5 mat-vecs reach ~1e-3 relative error where power iteration needs ~10.
    As for any Krylov method, a start nearly orthogonal to the wanted eigenvector can stop at
    the next eigenvalue. Cost: ``num_matvecs`` mat-vecs, one vector per call (so a
    :class:`HessianOperator` uses its cached gradient graph), plus ``O(P m^2)``.

    Args:
        A: a ``(P, P)`` tensor, an operator (``HessianOperator``), or a callable mat-mat
            with ``dim=P``.
        tol: relative tolerance on the eigenvalue (not on the residual, as ARPACK's).
        generator: draws the Gaussian start vector (when no ``start`` is given).
        start: the start vector ``(P,)`` instead of a random one, e.g. the ``vector`` of an
            earlier estimate when tracking the top eigenvalue over training: a few steps
            after it, it is close to the new top eigenvector, and Lanczos needs fewer
            mat-vecs (on the MLP of ``benchmarks/curvature.py``, 10 SGD steps later: 2-4 at
            tol 1e-3, where a random start needs 5 or more for a 1e-3 error; see
            ``docs/benchmarks_curvature.md``). Caution: if
            the top two eigenvalues swapped since, a start close to the old top eigenvector
            is close to an eigenvector of the new second one, and Lanczos can stop there with
            a small residual (seen once in three points on the MNIST CNN: 3.8 % low); run
            cold now and then to catch that.

    Example:
        >>> A = torch.diag(torch.tensor([4.0, -5.0, 1.0, 2.0]))
        >>> round(lanczos_eigenvalue(A, which="LM", tol=1e-8).value, 6)
        -5.0
    """
    if which not in _WHICH:
        raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    op = as_square(A, dim)
    if start is None:
        v0 = torch.randn(op.dim, generator=generator).to(dtype=op.dtype, device=op.device)
    else:
        v0 = _start_vector(start, op.dim).to(dtype=op.dtype, device=op.device)
    for alpha, beta, Q in lanczos_steps(op.matmat, v0, min(max_steps, op.dim)):
        value, err, s = _ritz(alpha, beta, which)
        done = err <= tol * abs(value) or beta[-1] == 0
        if done or len(alpha) == min(max_steps, op.dim):
            vector = s.to(Q.dtype) @ Q[: len(alpha)]  # (P,)
            return EigenEstimate(value, err, vector, len(alpha), done)
    raise AssertionError("unreachable: lanczos_steps yields at least once")


def _start_vector(start: Tensor, dim: int) -> Tensor:
    if not isinstance(start, Tensor) or start.reshape(-1).shape != (dim,):
        shape = tuple(start.shape) if isinstance(start, Tensor) else type(start).__name__
        raise ValueError(f"start must be a tensor of {dim} numbers (the operator's size), got "
                         f"{shape}")
    v0 = start.detach().reshape(-1)
    norm = float(v0.norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"start must be a finite nonzero vector, its norm is {norm}; pass "
                         "start=None for a random one")
    return v0


def _ritz(alpha: list[float], beta: list[float], which: str) -> tuple[float, float, Tensor]:
    """The wanted Ritz value of ``T_m``, its error estimate, and its eigenvector ``(m,)``."""
    m = len(alpha)
    a, b = torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64)
    T = torch.diag(a) + torch.diag(b[: m - 1], 1) + torch.diag(b[: m - 1], -1)
    theta, S = torch.linalg.eigh(T)  # ascending
    i = {"LA": m - 1, "SA": 0, "LM": int(theta.abs().argmax())}[which]
    r = b[m - 1].item() * abs(S[m - 1, i].item())
    others = torch.cat([theta[:i], theta[i + 1:]])
    gap = (others - theta[i]).abs().min().item() if m > 1 else 0.0
    err = min(r, r * r / gap) if gap > 0 else r  # one Ritz value (or a double one): no gap
    return theta[i].item(), err, S[:, i]
