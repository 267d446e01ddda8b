"""Compiled (numba) pair statistics of a (B, B) Gram: what the instruments read every step.

Measuring coherence, confusion and stiffness on every training step spends most of its
non-GEMM time in a few dozen small NumPy calls over ~10^4 numbers; these kernels do the same
arithmetic in one call each (``docs/benchmarks_overhead.md``). ``graddyn._kernels.
pair_kernels()`` hands them out (or None: numba missing, switched off); the NumPy functions
they replace are the reference (``tests/_kernels/test_pairs.py`` compares the two).

Results are float64 whatever the input dtype (sums are accumulated in float64).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"nogil": True, "cache": True}


@njit(**_JIT)
def gram_and_cosines(grams):
    """(L, B, B) per-layer Grams -> (G, C), both (B, B) float64 and exactly symmetric: G the
    sum over layers of (Gram + Gram^T) / 2 (a matmul's A A^T need not be bitwise symmetric),
    C the cosines G_ij / (|g_i| |g_j|) clipped to [-1, 1], 0 where a norm is 0 (as
    ``graddyn._gram.cosine_matrix``)."""
    n_layers, b = grams.shape[0], grams.shape[1]
    g = np.zeros((b, b))
    for k in range(n_layers):
        for i in range(b):
            for j in range(b):
                g[i, j] += grams[k, i, j]
    for i in range(b):
        for j in range(i + 1, b):
            v = 0.5 * (g[i, j] + g[j, i])
            g[i, j] = v
            g[j, i] = v
    norms = np.empty(b)
    for i in range(b):
        d = g[i, i]
        norms[i] = np.sqrt(d) if d > 0.0 else 0.0
    c = np.empty((b, b))
    for i in range(b):
        for j in range(b):
            den = norms[i] * norms[j]
            if den > 0.0:
                v = g[i, j] / den
                c[i, j] = 1.0 if v > 1.0 else (-1.0 if v < -1.0 else v)
            else:
                c[i, j] = 0.0
    return g, c


@njit(**_JIT)
def stiffness_sums(g, c, y, k):
    """(3, K, K): sums over ordered pairs i != j with (y_i, y_j) = (a, b) of the cosine, of
    sign(G_ij), and the pair count (as ``graddyn.instruments.stiffness.stiffness_sums``);
    (0, K, K) if a label lies outside [0, K) (the caller raises). The Gram and the cosines
    are symmetric, so each unordered pair is visited once. The sign is computed without a
    branch: on a new Gram every step a branch on it mispredicts about half the time
    (``docs/benchmarks_overhead.md``)."""
    b = g.shape[0]
    n = np.zeros(k)  # examples per class
    for i in range(b):
        if y[i] < 0 or y[i] >= k:
            return np.zeros((0, k, k))
        n[y[i]] += 1.0
    out = np.zeros((3, k, k))
    for i in range(b):
        a = y[i]
        for j in range(i + 1, b):
            v = g[i, j]
            s = (v > 0.0) * 1.0 - (v < 0.0) * 1.0
            if v != v:  # NaN stays NaN, as np.sign
                s = v
            d = y[j]
            out[0, a, d] += c[i, j]
            out[1, a, d] += s
    for m in range(2):  # (a, b) and (b, a) get the same pairs
        for a in range(k):
            for d in range(a + 1, k):
                t = out[m, a, d] + out[m, d, a]
                out[m, a, d] = t
                out[m, d, a] = t
            out[m, a, a] *= 2.0
    for a in range(k):  # ordered pairs i != j per class pair
        for d in range(k):
            out[2, a, d] = n[a] * n[d] - (n[a] if a == d else 0.0)
    return out


@njit(**_JIT)
def stiffness_means(sums):
    """(3, K, K) sums (cosine, sign, counts; as ``stiffness_sums``) -> (scalars (6,): cosine,
    cosine_within, cosine_between, sign, sign_within, sign_between; means (2, K, K) of cosine
    and sign, NaN where a class pair has no pairs)."""
    k = sums.shape[1]
    tot = np.zeros(3)
    within = np.zeros(3)
    means = np.full((2, k, k), np.nan)
    for a in range(k):
        for b in range(k):
            for m in range(3):
                tot[m] += sums[m, a, b]
                if a == b:
                    within[m] += sums[m, a, b]
            n = sums[2, a, b]
            if n > 0.0:
                means[0, a, b] = sums[0, a, b] / n
                means[1, a, b] = sums[1, a, b] / n
    scalars = np.full(6, np.nan)
    between = tot[2] - within[2]
    for m in range(2):
        if tot[2] > 0.0:
            scalars[3 * m] = tot[m] / tot[2]
        if within[2] > 0.0:
            scalars[3 * m + 1] = within[m] / within[2]
        if between > 0.0:
            scalars[3 * m + 2] = (tot[m] - within[m]) / between
    return scalars, means


@njit(**_JIT)
def upper_pairs(g, c):
    """The pairs i < j (row-major) of two (B, B) matrices -> two (B (B - 1) / 2,) arrays."""
    b = g.shape[0]
    m = b * (b - 1) // 2
    gu, cu = np.empty(m), np.empty(m)
    p = 0
    for i in range(b):
        for j in range(i + 1, b):
            gu[p] = g[i, j]
            cu[p] = c[i, j]
            p += 1
    return gu, cu


@njit(**_JIT)
def confusion_numbers(inner, s, quantiles, num_bins):
    """Pair values (``s``: the cosines, sorted ascending by the caller: NumPy's vectorised sort
    beats numba's) -> (numbers: min_inner, min_cosine, mean_cosine, then one per quantile (linear
    interpolation); histogram (num_bins,) int64 of the cosines in equal bins [e_k, e_k+1) on
    [-1, 1], values below -1 in the first and 1.0 in the last), as
    ``graddyn.instruments.confusion.confusion_stats``."""
    n = s.size
    out = np.empty(3 + quantiles.size)
    out[0] = inner.min()
    out[1] = s[0]
    out[2] = s.mean()
    for q in range(quantiles.size):
        pos = quantiles[q] * (n - 1)
        lo = min(int(np.floor(pos)), n - 1)
        hi = min(lo + 1, n - 1)
        out[3 + q] = s[lo] + (pos - lo) * (s[hi] - s[lo])
    hist = np.zeros(num_bins, dtype=np.int64)
    start = 0
    for e in range(1, num_bins):
        cut = np.searchsorted(s, -1.0 + 2.0 * e / num_bins)  # values below edge e
        hist[e - 1] = cut - start
        start = cut
    hist[num_bins - 1] = n - start
    return out, hist
