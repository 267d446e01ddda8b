"""Cosines from a Gram matrix, shared by the engine (``BatchGrads``) and the instruments
(coherence, confusion, stiffness), so one measurement step computes them once.

The instruments' statistics are a few dozen reductions over the B x B Gram (B = 100: 10^4
numbers). They run on the host in NumPy float64 (``host_pairs``): one transfer of the Gram,
then calls costing ~1-5 us each instead of torch's ~5-20 us dispatch, which dominated when
measuring every training step."""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import Tensor


def cosine_matrix(gram: Tensor) -> Tensor:
    """(B, B) Gram -> (B, B) cosines G_ij / (|g_i| |g_j|), clamped to [-1, 1]; a zero gradient
    has cosine 0 with everything (the diagonal is 1 except for zero gradients)."""
    norms = gram.diagonal().clamp_min(0).sqrt()  # (B,)
    denom = norms[:, None] * norms[None, :]
    cos = gram / denom.clamp_min(torch.finfo(gram.dtype).tiny)
    return torch.where(denom > 0, cos, 0.0).clamp_(-1.0, 1.0)


def cosine_matrix_np(gram: np.ndarray) -> np.ndarray:
    """``cosine_matrix`` for a float64 NumPy Gram."""
    norms = np.sqrt(np.clip(np.diagonal(gram), 0.0, None))  # (B,)
    denom = np.outer(norms, norms)
    positive = denom > 0
    cos = np.divide(gram, denom, out=np.zeros_like(gram), where=positive)
    return np.clip(cos, -1.0, 1.0, out=cos)


def host64(t: Tensor | np.ndarray) -> np.ndarray:
    """A small (O(B^2)) tensor or array as a float64 NumPy array, copied only if needed: the
    instruments' statistics are a few dozen reductions over ~5,000 numbers, where NumPy's
    per-call cost (~1 us) beats torch's dispatcher (~5-10 us) and ``np.sort`` beats
    ``torch.sort`` by ~10x on the CPU."""
    if isinstance(t, np.ndarray):
        return t.astype(np.float64, copy=False)
    return t.detach().cpu().numpy().astype(np.float64, copy=False)


def host_pairs(grads: object) -> tuple[np.ndarray, np.ndarray]:
    """(Gram, cosine matrix), both (B, B) float64 NumPy arrays, read-only: memoised by a
    ``BatchGrads`` (``host_pairs()``), else from any object with ``gram()``."""
    cached = getattr(grads, "host_pairs", None)
    if callable(cached):
        return cached()
    return pairs_from_gram(grads.gram())  # type: ignore[attr-defined]


def pairs_from_gram(gram: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, B) Gram tensor -> read-only float64 (Gram, cosine matrix) on the host."""
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"need a square (B, B) Gram, got {tuple(gram.shape)}")
    g = gram.detach().cpu().numpy().astype(np.float64)
    c = cosine_matrix_np(g)
    g.flags.writeable = c.flags.writeable = False
    return g, c


@functools.lru_cache(maxsize=16)
def upper_index(b: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of the pairs i < j of a (b, b) matrix (row-major order)."""
    return np.triu_indices(b, 1)


@functools.lru_cache(maxsize=16)
def upper_flat(b: int) -> np.ndarray:
    """Flat positions i * b + j of the pairs i < j (row-major), for ``np.take`` (~4x faster
    than indexing with the two index arrays)."""
    i, j = upper_index(b)
    return i * b + j
