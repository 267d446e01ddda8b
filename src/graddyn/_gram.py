"""Cosines from a Gram matrix, shared by the engine (``BatchGrads``) and the instruments
(coherence, confusion, stiffness), so one measurement step computes them once.

The instruments' statistics are a few dozen reductions over the B x B Gram (B = 100: 10^4
numbers). They run on the host in NumPy float64 (``host_pairs``): one transfer of the Gram,
then calls costing ~1-5 us each instead of torch's ~5-20 us dispatch, which dominated when
measuring every training step. Where numba is available the hottest of them run compiled
(``graddyn._pairs_jit``, one call each; ``pair_kernels()``), with these NumPy functions as
the reference and the fallback."""

from __future__ import annotations

import functools
import warnings
from types import ModuleType
from weakref import WeakKeyDictionary

import numpy as np
import torch
from torch import Tensor

from graddyn._robust_kernel import enabled_by_env

KERNELS_ENABLED = enabled_by_env()
"""Module switch (``GRADDYN_NO_KERNEL=1`` sets it False): False sends every pair statistic
to the NumPy path."""

_pair_jit: list[ModuleType | None] = []  # [module or None] once tried


def pair_kernels() -> ModuleType | None:
    """The compiled pair statistics (``graddyn._pairs_jit``), or None when switched off or
    numba cannot import / compile them (one warning). The first call compiles them, or loads
    numba's on-disk cache (well under a second)."""
    if not KERNELS_ENABLED:
        return None
    if not _pair_jit:
        try:
            from graddyn import _pairs_jit as jit

            g, c = jit.gram_and_cosines(np.eye(2)[None])  # a tiny real call of each kernel
            g.flags.writeable = c.flags.writeable = False  # as host_pairs gives them
            jit.gram_and_cosines(np.eye(2, dtype=np.float32)[None])
            jit.stiffness_means(jit.stiffness_sums(g, c, np.zeros(2, np.int64), 1))
            jit.confusion_numbers(np.zeros(1), np.zeros(1), np.array([0.5]), 2)
        except ImportError:
            jit = None
        except Exception as err:  # a numba that cannot compile them: NumPy path
            warnings.warn(f"graddyn: compiled pair statistics unavailable ({err!r}); using "
                          "NumPy", stacklevel=2)
            jit = None
        _pair_jit.append(jit)
    return _pair_jit[0]


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


_HOST: WeakKeyDictionary = WeakKeyDictionary()  # grads object -> (Gram, cosines) on the host


def host_pairs(grads: object) -> tuple[np.ndarray, np.ndarray]:
    """(Gram, cosine matrix), both (B, B) float64 NumPy arrays, read-only, memoised per
    grads object (instruments of one step share them). From the per-layer Grams summed in
    float64 when the object gives them (``gram(per_layer=True)``), else from ``gram()``."""
    try:
        return _HOST[grads]
    except (KeyError, TypeError):
        pass
    try:
        per_layer = grads.gram(per_layer=True)  # type: ignore[attr-defined]
        pairs = pairs_from_grams(list(per_layer.values()))
    except TypeError:  # a gram() without per_layer
        pairs = pairs_from_gram(grads.gram())  # type: ignore[attr-defined]
    try:
        _HOST[grads] = pairs
    except TypeError:  # not weak-referenceable: not memoised
        pass
    return pairs


def pairs_from_gram(gram: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(B, B) Gram tensor -> read-only float64 (Gram, cosine matrix) on the host."""
    return pairs_from_grams([gram])


def pairs_from_grams(grams: list[Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Per-layer (B, B) Grams -> read-only float64 (their sum, its cosine matrix) on the host;
    the sum is taken in float64 and made exactly symmetric ((G + G^T) / 2)."""
    if not grams or any(g.dim() != 2 or g.shape != grams[0].shape or g.shape[0] != g.shape[1]
                        for g in grams):
        raise ValueError(f"need square (B, B) Grams of one shape, got "
                         f"{[tuple(g.shape) for g in grams]}")
    stack = np.stack([g.detach().cpu().numpy() for g in grams])  # (L, B, B); a little
    # cheaper than torch.stack (21 vs 26 us per call in a profile of the measured step)
    jit = pair_kernels()
    if jit is not None and stack.dtype in (np.float32, np.float64):
        g, c = jit.gram_and_cosines(stack)
    else:
        g = stack.astype(np.float64).sum(0)
        g = 0.5 * (g + g.T)  # exactly symmetric, as the kernel's
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
