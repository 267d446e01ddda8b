"""Stochastic trace estimators: Hutchinson (with a stopping rule) and Hutch++."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from graddyn.curvature._matmat import MatMat, Operator, as_square


@dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its standard error.

    value: the estimate.  std_error: sample std of the per-vector estimates / sqrt(vectors)
    (for Hutch++, of the residual part; the low-rank part is exact given its sketch).
    num_matvecs: mat-vecs spent.  converged: the stopping rule (``rtol``) was met.
    """

    value: float
    std_error: float
    num_matvecs: int
    converged: bool

    def __float__(self) -> float:
        return self.value


def _check_budget(name: str, value: int, least: int) -> None:
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")


def hutchinson_trace(A: Tensor | Operator | MatMat, max_vectors: int = 100, *,
                     batch_size: int = 10, rtol: float | None = None, min_vectors: int = 10,
                     dim: int | None = None,
                     generator: torch.Generator | None = None) -> TraceEstimate:
    """Hutchinson's estimator ``tr(A) ~ (1/m) sum_i z_i^T A z_i`` with Rademacher ``z_i``.

    Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines"; as used for Hessians by Yao et al. (2020), PyHessian.
    Vectors go ``batch_size`` at a time through ``A.matmat`` ((P, batch_size) per call). With
    ``rtol`` it stops once ``min_vectors`` are drawn and ``SE < rtol * |estimate|``, where
    ``SE = std(z_i^T A z_i) / sqrt(m)``; otherwise it uses all ``max_vectors``.
    Variance: ``2 (||A||_F^2 - sum_i A_ii^2) / m``. Cost: ``m`` mat-vecs. For the Hessian of a
    piecewise-linear network (ReLU, max-pooling, ...), :func:`exact_trace` gives the value this
    converges to, without random vectors and typically for the cost of ~3 vectors.

    Args:
        A: a ``(P, P)`` tensor, an operator (``HessianOperator``), or a callable mat-mat
            with ``dim=P``.

    Example:
        >>> hutchinson_trace(torch.diag(torch.arange(4.0)), 50).value  # Rademacher: exact
        6.0
    """
    op = as_square(A, dim)
    return hutchinson_loop(lambda Z: (Z * op.matmat(Z)).sum(0),
                           lambda k: op.random_vectors(k, generator),
                           max_vectors, batch_size, rtol, min_vectors)


def hutchinson_loop(forms: Callable[[Tensor], Tensor], draw: Callable[[int], Tensor],
                    max_vectors: int, batch_size: int, rtol: float | None,
                    min_vectors: int) -> TraceEstimate:
    """Hutchinson's loop with its stopping rule: ``draw(k)`` gives ``(P, k)`` vectors and
    ``forms(Z)`` their quadratic forms ``(k,)``; see :func:`hutchinson_trace`."""
    _check_budget("max_vectors", max_vectors, 2)
    _check_budget("batch_size", batch_size, 1)
    samples: list[Tensor] = []
    m = 0
    while m < max_vectors:
        k = min(batch_size, max_vectors - m)
        samples.append(forms(draw(k)).detach().to(torch.float64).cpu())
        m += k
        est, se = _mean_se(torch.cat(samples))
        if rtol is not None and m >= min_vectors and se <= rtol * abs(est):
            return TraceEstimate(est, se, m, True)
    est, se = _mean_se(torch.cat(samples))
    return TraceEstimate(est, se, m, False)


def _mean_se(s: Tensor) -> tuple[float, float]:
    se = s.std().item() / math.sqrt(len(s)) if len(s) > 1 else math.inf
    return s.mean().item(), se


def hutchpp_trace(A: Tensor | Operator | MatMat, num_matvecs: int = 99, *,
                  dim: int | None = None,
                  generator: torch.Generator | None = None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff 2021): low-rank sketch + Hutchinson on the rest.

    With ``k = num_matvecs // 3``: ``Q = orth(A S)`` for ``(P, k)`` Rademacher ``S``, then
    ``tr(A) ~ tr(Q^T A Q) + (1/k) tr(G^T (I - QQ^T) A (I - QQ^T) G)``. Error ``O(1/m)`` instead
    of Hutchinson's ``O(1/sqrt(m))`` for matrices with a few dominant eigenvalues (Hessians).
    Cost: ``3k`` mat-vecs in three batched calls, plus a ``(P, k)`` QR.

    Example:
        >>> round(hutchpp_trace(torch.eye(5), 15).value, 9)  # the sketch spans R^5: exact
        5.0
    """
    _check_budget("num_matvecs", num_matvecs, 6)
    op = as_square(A, dim)
    k = num_matvecs // 3
    Q, _ = torch.linalg.qr(op.matmat(op.random_vectors(k, generator)))
    low = (Q * op.matmat(Q)).sum().item()
    G = op.random_vectors(k, generator)
    G = G - Q @ (Q.T @ G)  # (I - QQ^T) G; A is symmetric so one projection per side suffices
    est, se = _mean_se((G * op.matmat(G)).sum(0).detach().to(torch.float64).cpu())
    return TraceEstimate(low + est, se, 3 * k, False)
