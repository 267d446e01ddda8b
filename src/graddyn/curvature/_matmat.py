"""What the estimators accept: an explicit matrix, an operator, or a callable mat-mat."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor

MatMat = Callable[[Tensor], Tensor]


@runtime_checkable
class Operator(Protocol):
    """Anything square with ``matmat(V: (P, K)) -> (P, K)`` and ``shape``, e.g.
    ``HessianOperator``."""

    shape: Any

    def matmat(self, V: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Square:
    """A normalised square operator: ``matmat`` plus its size, dtype and device."""

    matmat: MatMat
    dim: int
    dtype: torch.dtype
    device: torch.device

    def random_vectors(self, k: int, generator: torch.Generator | None) -> Tensor:
        """``(dim, k)`` Rademacher (+-1) vectors, drawn on the CPU for reproducibility.

        A transposed view of ``(k, dim)``, so each vector is one contiguous row (what the graph
        mode of ``HessianOperator`` feeds to autograd). Drawn as 31 random bits per int32
        ``randint`` draw rather than one draw per sign (``docs/benchmarks_curvature.md``)."""
        n = k * self.dim
        words = torch.randint(0, 2**31, (-(-n // 31), 1), generator=generator,
                              dtype=torch.int32)  # (n/31, 1)
        bits = (words >> torch.arange(31, dtype=torch.int32)) & 1  # (n/31, 31) of 0/1
        signs = bits.reshape(-1)[:n].to(self.dtype).mul_(2).sub_(1)
        return signs.reshape(k, self.dim).to(self.device).T

    def to_scipy(self) -> LinearOperator:
        def mm(X: np.ndarray) -> np.ndarray:
            X2 = torch.as_tensor(np.ascontiguousarray(X.reshape(self.dim, -1)))
            out = self.matmat(X2.to(dtype=self.dtype, device=self.device))
            return out.detach().cpu().to(torch.float64).numpy().reshape(X.shape)

        # symmetric: the adjoint is the operator itself
        return LinearOperator((self.dim, self.dim), matvec=mm, matmat=mm, rmatvec=mm,
                              rmatmat=mm, dtype=np.float64)


def as_square(A: Tensor | Operator | MatMat, dim: int | None = None) -> Square:
    """Normalise ``A`` (a ``(P, P)`` tensor, an operator with ``matmat``/``shape``, or a callable
    ``(P, K) -> (P, K)`` with ``dim=P``) to a :class:`Square`."""
    if isinstance(A, Tensor):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(A.shape)}")
        return Square(lambda V: A @ V, A.shape[0], A.dtype, A.device)
    if isinstance(A, Operator):
        dtype = getattr(A, "dtype", torch.get_default_dtype())
        device = getattr(A, "device", torch.device("cpu"))
        return Square(A.matmat, int(A.shape[0]), dtype, torch.device(device))
    if callable(A):
        if dim is None:
            raise ValueError("a callable mat-mat needs its size: pass dim=P")
        return Square(A, dim, torch.get_default_dtype(), torch.device("cpu"))
    raise TypeError(f"expected a Tensor, an operator with matmat/shape, or a callable; got "
                    f"{type(A).__name__}")
