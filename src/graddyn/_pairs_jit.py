"""Compiled (numba) pair statistics of a (B, B) Gram: what the instruments read every step.

Measuring coherence, confusion and stiffness on every training step spends most of its
non-GEMM time in a few dozen NumPy calls over ~10^4 numbers (~1-5 us each, ~3x more right
after the step's large matmuls have flushed the caches). These kernels do the same
arithmetic in one call each. ``graddyn._gram.pair_kernels()`` hands them out (or None: numba
missing, ``GRADDYN_NO_KERNEL=1``); the NumPy functions they replace stay the reference
(``tests/test_pairs_jit.py`` compares the two).

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
    ``graddyn._gram.cosine_matrix_np``)."""
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
    branch: on fresh data every step a branch on it mispredicts about half the time
    (measured 44 us vs 11 us on the same B = 100 Gram)."""
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
def _sort_small(a, lo, hi):
    """Sort a[lo:hi] in place (no NaN): insertion sort for the few values a bucket usually
    holds (NumPy-in-numba's sort allocates: ~0.5 us per tiny slice), else np.sort."""
    if hi - lo > 32:
        a[lo:hi] = np.sort(a[lo:hi])
        return
    for i in range(lo + 1, hi):
        v = a[i]
        j = i - 1
        while j >= lo and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v


@njit(**_JIT)
def _order_statistics(x, ranks, lo, hi):
    """x's order statistics (ascending) at ``ranks``, in O(n): count the values in up to
    1,024 equal-width buckets over [lo, hi] (bucketing keeps the order), then gather and
    sort only the buckets that hold a wanted rank. ``lo`` / ``hi``: min and max of x (no
    NaN)."""
    n = x.size
    out = np.empty(ranks.size)
    if hi == lo:
        out[:] = lo
        return out
    nb = max(1, min(n, 512))
    scale = nb / (hi - lo)
    if not np.isfinite(scale) or scale == 0.0:  # subnormal or infinite range: plain sort
        s = np.sort(x)
        for q in range(ranks.size):
            out[q] = s[ranks[q]]
        return out
    idx = np.empty(n, dtype=np.int64)
    counts = np.zeros((4, nb), dtype=np.int64)  # 4 interleaved tallies: consecutive values
    for t in range(n):  # in one bucket would otherwise wait on each other's increment
        k = min(int((x[t] - lo) * scale), nb - 1)  # monotone in x[t]
        idx[t] = k
        counts[t & 3, k] += 1
    start = np.zeros(nb + 1, dtype=np.int64)  # start[k]: values in buckets < k
    for k in range(nb):
        start[k + 1] = start[k] + counts[0, k] + counts[1, k] + counts[2, k] + counts[3, k]
    slot = np.full(nb, -1, dtype=np.int64)  # bucket -> its place among the wanted ones
    base = np.zeros(ranks.size + 1, dtype=np.int64)  # where each wanted bucket's values go
    buckets = np.empty(ranks.size, dtype=np.int64)
    m = 0
    for q in range(ranks.size):
        k = np.searchsorted(start, ranks[q], side="right") - 1
        if slot[k] < 0:
            slot[k] = m
            buckets[m] = k
            base[m + 1] = base[m] + start[k + 1] - start[k]
            m += 1
    buf = np.empty(base[m])
    fill = base[:m].copy()
    for t in range(n):
        w = slot[idx[t]]
        if w >= 0:
            buf[fill[w]] = x[t]
            fill[w] += 1
    for w in range(m):
        _sort_small(buf, base[w], base[w + 1])
    for q in range(ranks.size):
        k = np.searchsorted(start, ranks[q], side="right") - 1
        out[q] = buf[base[slot[k]] + ranks[q] - start[k]]
    return out


@njit(**_JIT)
def _range_and_sum(x):
    """(min, max, sum) of x, NaN skipped by min / max (a NaN makes the sum NaN): four
    independent accumulators, so the additions do not wait on each other (~5x faster than
    one chain on 5,000 values)."""
    n = x.size
    s0 = s1 = s2 = s3 = 0.0
    lo0 = lo1 = np.inf
    hi0 = hi1 = -np.inf
    m = n - n % 4
    for t in range(0, m, 4):
        a, b, c, d = x[t], x[t + 1], x[t + 2], x[t + 3]
        s0 += a
        s1 += b
        s2 += c
        s3 += d
        lo0 = min(lo0, min(a, b))
        lo1 = min(lo1, min(c, d))
        hi0 = max(hi0, max(a, b))
        hi1 = max(hi1, max(c, d))
    total = (s0 + s1) + (s2 + s3)
    lo, hi = min(lo0, lo1), max(hi0, hi1)
    for t in range(m, n):
        total += x[t]
        lo = min(lo, x[t])
        hi = max(hi, x[t])
    return lo, hi, total


@njit(**_JIT)
def _histogram(cos, num_bins):
    """Counts in the bins [e_k, e_k+1), e_k = -1 + 2 k / num_bins (the count of inner edges
    <= v, as a binary search over the sorted values gives): below -1 in the first, from the
    last edge up (and NaN, which sorts last) in the last."""
    tally = np.zeros((4, num_bins), dtype=np.int64)  # 4 interleaved: consecutive values in
    edges = np.empty(num_bins + 1)  # one bin would otherwise wait on each other's increment
    for e in range(num_bins + 1):
        edges[e] = -1.0 + 2.0 * e / num_bins  # as the reference's
    half = 0.5 * num_bins
    top = num_bins - 1
    for t in range(cos.size):
        v = cos[t]
        if -1.0 <= v <= 1.0:
            j = min(int((v + 1.0) * half), top)  # an estimate, made exact below
            while j > 0 and v < edges[j]:
                j -= 1
            while j < top and v >= edges[j + 1]:
                j += 1
        else:
            j = 0 if v < -1.0 else top  # NaN: last
        tally[t & 3, j] += 1
    return tally[0] + tally[1] + tally[2] + tally[3]


@njit(**_JIT)
def confusion_numbers(inner, cos, quantiles, num_bins):
    """Pair values -> (numbers: min_inner, min_cosine, mean_cosine, then one per quantile
    (linear interpolation between order statistics); histogram (num_bins,) int64 of the
    cosines in equal bins [e_k, e_k+1) on [-1, 1], values below -1 in the first and 1.0 (and
    NaN) in the last), as ``graddyn.instruments.confusion.confusion_stats`` on the sorted
    cosines. ``cos`` need not be sorted: the order statistics come from
    ``_order_statistics`` (O(n); NumPy's sort of ~5,000 values alone took 31-38 us). With a
    NaN among the cosines, they are sorted (NaN last) as the reference does."""
    n = cos.size
    nq = quantiles.size
    out = np.empty(3 + nq)
    out[0] = inner.min()
    lo_r = np.empty(nq, dtype=np.int64)
    for q in range(nq):
        lo_r[q] = min(int(np.floor(quantiles[q] * (n - 1))), n - 1)
    ranks = np.empty(2 * nq, dtype=np.int64)
    for q in range(nq):
        ranks[2 * q] = lo_r[q]
        ranks[2 * q + 1] = min(lo_r[q] + 1, n - 1)
    lo, hi, total = _range_and_sum(cos)
    nan = False
    if total != total:  # a NaN, or +inf with -inf: look (a NaN always reaches the sum)
        for t in range(n):
            if cos[t] != cos[t]:
                nan = True
                break
    hist = _histogram(cos, num_bins)
    if nan:
        s = np.sort(cos)  # NaN last
        stats = np.empty(2 * nq)
        for r in range(2 * nq):
            stats[r] = s[ranks[r]]
        lo = s[0]
    else:
        stats = _order_statistics(cos, ranks, lo, hi)
    out[1] = lo
    out[2] = total / n
    for q in range(nq):
        a, b = stats[2 * q], stats[2 * q + 1]
        out[3 + q] = a + (quantiles[q] * (n - 1) - lo_r[q]) * (b - a)
    return out, hist
