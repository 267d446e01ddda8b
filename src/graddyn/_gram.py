"""Cosines from a Gram matrix, shared by the engine (``BatchGrads.cosines``) and the
instruments (confusion, stiffness), so one measurement step computes them once."""

from __future__ import annotations

import torch
from torch import Tensor


def cosine_matrix(gram: Tensor) -> Tensor:
    """(B, B) Gram -> (B, B) cosines G_ij / (|g_i| |g_j|), clamped to [-1, 1]; a zero gradient
    has cosine 0 with everything (the diagonal is 1 except for zero gradients)."""
    norms = gram.diagonal().clamp_min(0).sqrt()  # (B,)
    denom = norms[:, None] * norms[None, :]
    cos = gram / denom.clamp_min(torch.finfo(gram.dtype).tiny)
    return torch.where(denom > 0, cos, 0.0).clamp_(-1.0, 1.0)


def cosines_of(grads: object) -> Tensor:
    """The (B, B) cosine matrix of a ``BatchGrads`` (memoised there) or of any object with
    ``gram()``."""
    cached = getattr(grads, "cosines", None)
    if callable(cached):
        return cached()
    return cosine_matrix(grads.gram().detach())  # type: ignore[attr-defined]
