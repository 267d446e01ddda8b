"""The host copy of a Gram matrix and its cosines, shared by the instruments (coherence,
confusion, stiffness) through ``host_pairs``, so one measurement step computes them once.

The instruments' statistics are a few dozen reductions over the B x B Gram (~10^4 numbers
at B = 100). They run on the host in NumPy float64 (``host_pairs``): one transfer of the
Gram, then calls far cheaper than torch's per-call dispatch, which dominated when measuring
every training step (``docs/benchmarks_overhead.md``). The functions here are the reference;
the compiled kernels (``graddyn._kernels.pair_kernels()``) are the fast path.
"""

from __future__ import annotations

import functools
from weakref import WeakKeyDictionary

import numpy as np
from torch import Tensor

from graddyn._kernels import pair_kernels


def cosine_matrix(gram: np.ndarray) -> np.ndarray:
    """(B, B) float64 Gram -> (B, B) cosines G_ij / (|g_i| |g_j|), clipped to [-1, 1]; a zero
    gradient has cosine 0 with everything (the diagonal is 1 except for zero gradients)."""
    norms = np.sqrt(np.clip(np.diagonal(gram), 0.0, None))  # (B,)
    denom = np.outer(norms, norms)
    positive = denom > 0
    cos = np.divide(gram, denom, out=np.zeros_like(gram), where=positive)
    return np.clip(cos, -1.0, 1.0, out=cos)


def host64(t: Tensor | np.ndarray) -> np.ndarray:
    """A small (O(B^2)) tensor or array as a float64 NumPy array, copied only if needed (see
    the module docstring for why the host)."""
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
    stack = np.stack([g.detach().cpu().numpy() for g in grams])  # (L, B, B)
    jit = pair_kernels()
    if jit is not None and stack.dtype in (np.float32, np.float64):
        g, c = jit.gram_and_cosines(stack)
    else:
        g = stack.astype(np.float64).sum(0)
        g = 0.5 * (g + g.T)  # exactly symmetric, as the kernel's
        c = cosine_matrix(g)
    g.flags.writeable = c.flags.writeable = False
    return g, c


@functools.lru_cache(maxsize=16)
def upper_flat(b: int) -> np.ndarray:
    """Flat positions i * b + j of the pairs i < j of a (b, b) matrix (row-major), for
    ``np.take`` (cheaper than indexing with two index arrays)."""
    i, j = np.triu_indices(b, 1)
    return i * b + j
