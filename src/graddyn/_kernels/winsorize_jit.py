"""numba kernels for the winsorized mean: the c + 1 largest and smallest of N values per
coordinate, as the correction ``winsorized_sum - plain_sum`` (reference: ``graddyn._robust``).

Values are ``v[n, i, j] = G[n, i] * X[n, j]``: an outer product per example (a Linear layer's
weight gradient, G = output grads (N, rows), X = inputs (N, cols)), so nothing is materialised;
a plain (N, w) block is ``G = ones (N, 1)`` (multiplying by 1 is exact).

Per output row i and column tile, two sorted lists per column are kept in a small buffer
(top: the k = c + 1 largest, descending; bottom: the k smallest, ascending). Examples come in
groups of 4: the group is sorted per column by a 5-comparator network, then merged into each
list with elementwise max/min only (no branches, so the column loop vectorizes)::

    top'[l] = max(top[l], min(top[l-1], s0), min(top[l-2], s1), min(top[l-3], s2),
                  min(top[l-4], s3))                      s0 >= s1 >= s2 >= s3: the group

with sentinel rows top[-1] = +inf (so min(top[-1], s_l) = s_l) and top[-2..-4] = -inf (terms
that do not exist drop out of the max). Cost per value: a multiply and ~2.5 ops of sorting,
plus 2 min/max per list level and side (fewer at levels 0 and 1), i.e. about 4 k ops; the
lists of a column tile stay in cache (speed: ``docs/benchmarks_winsorize.md``). Exact
shortcuts: examples with G[n, i] == 0 (ReLU-dead units) give the value 0 in every column:
they are skipped, and min(Z, k) zeros are merged in at once instead (only k of the Z equal
zeros can be among the k best; see ``_insert_copies``); and when X >= 0 (ReLU outputs) each
example feeds only the list on its sign's side (see ``corrections``), halving the merges.

Every column's result uses the same ops in the same order whatever the tile, row range or
thread that computes it (max/min/mul are exact; the final sum has a fixed order), so results
are bitwise independent of chunking and thread count. No ``fastmath``: the sentinels are
infinities, and reassociation would make the result depend on the vector/scalar split.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"nogil": True, "cache": True}
HEAD = 4
"""Rows of sentinels before the list in a buffer (HEAD + k, tile): rows 0..2 are the worst
value (top[-4..-2] = -inf for the top list), row 3 the best (top[-1] = +inf)."""


@njit(**_JIT)
def _max(a, b):
    return a if a > b else b


@njit(**_JIT)
def _min(a, b):
    return a if a < b else b


@njit(**_JIT)
def _sorted4(x0, x1, x2, x3, g, s, w):
    """s[m, :w] = the 4 values g[m] * x_m[:w], sorted descending per column."""
    g0, g1, g2, g3 = g[0], g[1], g[2], g[3]
    for j in range(w):
        a, b, c, d = g0 * x0[j], g1 * x1[j], g2 * x2[j], g3 * x3[j]
        a, b = (a, b) if a > b else (b, a)
        c, d = (c, d) if c > d else (d, c)
        a, c = (a, c) if a > c else (c, a)
        b, d = (b, d) if b > d else (d, b)
        b, c = (b, c) if b > c else (c, b)
        s[0, j], s[1, j], s[2, j], s[3, j] = a, b, c, d


@njit(**_JIT)
def _merge_top(top, top2, s, k, w):
    """Merge the sorted group s (4, w) into the top list: top -> top2.

    Levels 0 and 1 have 1 and 2 group terms and are written out; deeper levels use all four
    (absent terms meet the -inf sentinel rows and drop out of the max). Reads only ``top``
    and writes only ``top2`` (double buffer): an in-place update would let LLVM turn the
    unchanged lanes into masked stores, which are slow on x86. One list per loop: both lists
    (or more special levels) in one loop vectorize worse for c >= 4."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    for l in range(k):
        r = HEAD + l
        t0, t1, t2, t3, t4 = top[r], top[r - 1], top[r - 2], top[r - 3], top[r - 4]
        out = top2[r]
        if l == 0:
            for j in range(w):
                out[j] = _max(t0[j], s0[j])
        elif l == 1:
            for j in range(w):
                out[j] = _max(_max(t0[j], _min(t1[j], s0[j])), s1[j])
        else:
            for j in range(w):
                m = _max(t0[j], _min(t1[j], s0[j]))
                m = _max(m, _min(t2[j], s1[j]))
                m = _max(m, _min(t3[j], s2[j]))
                out[j] = _max(m, _min(t4[j], s3[j]))


@njit(**_JIT)
def _merge_bottom(bot, bot2, s, k, w):
    """``_merge_top`` mirrored for the bottom list (ascending); the group ascending is s[3..0]."""
    s0, s1, s2, s3 = s[3], s[2], s[1], s[0]
    for l in range(k):
        r = HEAD + l
        t0, t1, t2, t3, t4 = bot[r], bot[r - 1], bot[r - 2], bot[r - 3], bot[r - 4]
        out = bot2[r]
        if l == 0:
            for j in range(w):
                out[j] = _min(t0[j], s0[j])
        elif l == 1:
            for j in range(w):
                out[j] = _min(_min(t0[j], _max(t1[j], s0[j])), s1[j])
        else:
            for j in range(w):
                m = _min(t0[j], _max(t1[j], s0[j]))
                m = _min(m, _max(t2[j], s1[j]))
                m = _min(m, _max(t3[j], s2[j]))
                out[j] = _min(m, _max(t4[j], s3[j]))


@njit(**_JIT)
def _insert_one(lists, lists2, x, g, k, w, largest):
    """Merge the single value g * x[:w] into a list (lists -> lists2)."""
    for l in range(k):
        r = HEAD + l
        t0, t1, out = lists[r], lists[r - 1], lists2[r]
        if largest:
            for j in range(w):
                out[j] = _max(t0[j], _min(t1[j], g * x[j]))
        else:
            for j in range(w):
                out[j] = _min(t0[j], _max(t1[j], g * x[j]))


@njit(**_JIT)
def _insert_copies(lists, lists2, v, z, k, w, largest):
    """Merge z copies of the value v into a list (lists -> lists2), 1 <= z <= k.

    A run of equal values needs one term per level: max over i < z of min(top[l-1-i], v) is
    min(top[l-z], v) (the list is descending; index -1 is the +inf sentinel, lower indices
    do not exist), so z zeros cost as much as one value."""
    for l in range(k):
        r = HEAD + l
        t0, tz, out = lists[r], lists[HEAD + max(l - z, -1)], lists2[r]
        if largest:
            for j in range(w):
                out[j] = _max(t0[j], _min(tz[j], v))
        else:
            for j in range(w):
                out[j] = _min(t0[j], _max(tz[j], v))


@njit(**_JIT)
def _feed(X, idx, g, lo, hi, a, w, k, s, top, pt, bot, pb, to_top, to_bottom):
    """Merge the values g[q] * X[idx[q], a:a + w] for lo <= q < hi into the top and/or the
    bottom lists (double buffers with read parities pt / pb) -> the new (pt, pb). Groups of
    4 are sorted once for both lists; the last 1-3 values are merged one by one."""
    full = lo + (hi - lo) // 4 * 4
    for q in range(lo, full, 4):
        _sorted4(X[idx[q], a:a + w], X[idx[q + 1], a:a + w], X[idx[q + 2], a:a + w],
                 X[idx[q + 3], a:a + w], g[q:q + 4], s, w)
        if to_top:
            _merge_top(top[pt], top[1 - pt], s, k, w)
            pt = 1 - pt
        if to_bottom:
            _merge_bottom(bot[pb], bot[1 - pb], s, k, w)
            pb = 1 - pb
    for q in range(full, hi):
        if to_top:
            _insert_one(top[pt], top[1 - pt], X[idx[q], a:a + w], g[q], k, w, True)
            pt = 1 - pt
        if to_bottom:
            _insert_one(bot[pb], bot[1 - pb], X[idx[q], a:a + w], g[q], k, w, False)
            pb = 1 - pb
    return pt, pb


@njit(**_JIT)
def _reset(lists, worst, k, w):
    """Empty lists: every entry ``worst`` (-inf for top), the sentinel row 3 -worst."""
    for r in range(HEAD + k):
        lists[r, :w] = worst
    lists[HEAD - 1, :w] = -worst


@njit(**_JIT)
def _active(G, i, idx, g):
    """The examples e with G[e, i] != 0 and their G[e, i] -> (P, M): those with G > 0 in
    idx[:P] / g[:P], those with G < 0 in idx[N - M:] / g[N - M:]."""
    n = G.shape[0]
    pos, neg = 0, 0
    for e in range(n):
        v = G[e, i]
        if v > 0:
            idx[pos], g[pos] = e, v
            pos += 1
        elif v < 0:
            neg += 1
            idx[n - neg], g[n - neg] = e, v
    return pos, neg


@njit(**_JIT)
def corrections(G, X, c, r0, r1, a_lo, a_hi, out, tile, x_nonneg):
    """out[i, j] = sum_{l<c} (t_c - t_l) + (b_c - b_l) for rows r0 <= i < r1 and columns
    a_lo <= j < a_hi, where t_l / b_l are the l-th largest / smallest (0-based) of the N
    values G[n, i] * X[n, j]. G (N, rows), X (N, cols), out (rows, cols), one float dtype;
    N >= c + 1. ``tile``: columns per list buffer (cache-sized).

    ``x_nonneg``: the caller checked X >= 0 (e.g. ReLU outputs). Then the examples with
    G[n, i] > 0 give values >= 0 and those with G[n, i] < 0 values <= 0, so the top list
    needs only the former and the bottom list only the latter (plus the zeros), whenever
    each side has at least c + 1 of them: every example is merged into one list only."""
    n = X.shape[0]
    k = c + 1
    dt = X.dtype
    top = np.empty((2, HEAD + k, tile), dt)  # double buffers: read [p], write [1 - p]
    bot = np.empty((2, HEAD + k, tile), dt)
    s = np.empty((4, tile), dt)
    zero = np.zeros(1, dt)[0]
    idx = np.empty(n, np.int64)
    g = np.empty(n, dt)
    for i in range(r0, r1):
        pos, neg = _active(G, i, idx, g)
        if pos + neg == 0:  # a unit dead for the whole batch: every value is 0
            out[i, a_lo:a_hi] = 0
            continue
        zeros = min(n - pos - neg, k)  # the skipped examples' values: only k can matter
        split = x_nonneg and pos + zeros >= k and neg + zeros >= k
        for a in range(a_lo, a_hi, tile):
            w = min(tile, a_hi - a)
            for b in range(2):
                _reset(top[b], -np.inf, k, w)
                _reset(bot[b], np.inf, k, w)
            pt, pb = _feed(X, idx, g, 0, pos, a, w, k, s, top, 0, bot, 0, True, not split)
            pt, pb = _feed(X, idx, g, n - neg, n, a, w, k, s, top, pt, bot, pb, not split, True)
            if zeros:
                _insert_copies(top[pt], top[1 - pt], zero, zeros, k, w, True)
                _insert_copies(bot[pb], bot[1 - pb], zero, zeros, k, w, False)
                pt, pb = 1 - pt, 1 - pb
            _write_correction(top[pt], bot[pb], c, out[i, a:a + w], w)


@njit(**_JIT)
def _write_correction(top, bot, c, out, w):
    """out[:w] = sum_{l<c} (top_c - top_l) + (bot_c - bot_l), summed in order l = 0, 1, .."""
    tc, bc = top[HEAD + c], bot[HEAD + c]
    out[:w] = 0
    for l in range(c):
        tl, bl = top[HEAD + l], bot[HEAD + l]
        for j in range(w):
            out[j] += (tc[j] - tl[j]) + (bc[j] - bl[j])
