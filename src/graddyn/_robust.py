"""Per-coordinate robust means over the example axis (the kernel behind winsorized SGD).

Winsorized mean (Chatterjee, "Coherent Gradients", ICLR 2020, section 3). For a column
``x[:, j]`` of ``B`` per-example values sorted as ``s_0 <= ... <= s_{B-1}``, values below
``s_c`` are set to ``s_c`` and values above ``s_{B-1-c}`` are set to ``s_{B-1-c}``, then
the column is averaged::

    winsorized_mean(x, c)[j] = (sum_{i=c}^{B-1-c} s_i + c * (s_c + s_{B-1-c})) / B

Correspondence with the paper's code (``np.percentile(g, q, axis=0, interpolation="nearest")``
per coordinate): with ``q_lo = 100 * c / (B - 1)`` and ``q_hi = 100 * (B - 1 - c) / (B - 1)``,
numpy's "nearest" rule picks exactly the sorted indices ``c`` and ``B - 1 - c``, so

    winsorized_mean(x, c) == np.clip(x, np.percentile(x, q_lo, 0, method="nearest"),
                                     np.percentile(x, q_hi, 0, method="nearest")).mean(0)

(``percentile_for_c`` / ``c_for_percentile`` convert). Ties need no care: clipping by value
gives the same result whichever of several equal values is called "the" (c+1)-th.

This module is the eager PyTorch implementation and the reference: ``winsorized_mean_rows``
and ``extremes_correction`` run anywhere (any device, any float dtype). The compiled kernel
(``graddyn._robust_kernel``, numba) computes the same correction several times faster on CPU;
``winsorized_mean_chunked`` and ``BatchGrads.winsorized_mean`` use it when it is usable and
fall back to the functions here otherwise (``GRADDYN_NO_KERNEL=1`` forces the fallback).

Cost (eager): ``c = 0`` is the plain mean. For ``c + 1 <= TREE_MAX_K`` (c <= 12) no sort: a
tournament of elementwise max/min merges of sorted top-(c+1) / bottom-(c+1) lists over row
pairs, in cache-sized column blocks: about 2 + (c + 1)^2 elementwise ops per element
(c = 1: ~6 passes; measured 3-10x faster than ``sort`` at c = 1..8, B = 100). Larger ``c``
sorts each column (``O(B log B)`` per column). Extra memory: about one block of ``x``
(``BLOCK_ELEMENTS``). Sums over rows are pairwise trees of elementwise adds, so each
column's result does not depend on the other columns (chunking is bitwise exact).

>>> x = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
>>> winsorized_mean_rows(x, 1)
tensor([1.5000])
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _robust_kernel as kernel

Tensor = torch.Tensor
_Op = Callable[[Tensor, Tensor], Tensor]

TREE_MAX_K = 13
"""Use the tournament (no sort) while ``c + 1 <= TREE_MAX_K``; sort above."""

BLOCK_ELEMENTS = 1 << 19
"""Elements of ``x`` per column block in the tournament (~2 MiB in float32, cache-resident)."""


def check_c(c: object, batch_size: int) -> int:
    """Validate the winsorization level ``c`` for a batch of ``batch_size`` rows."""
    if isinstance(c, bool) or not isinstance(c, int):
        raise TypeError(f"c must be an int (number of values clipped at each end), got {c!r}")
    if c < 0:
        raise ValueError(f"c must be >= 0 (c=0 is the plain mean), got c={c}")
    if batch_size < 1:
        raise ValueError("the winsorized mean needs at least one row (example)")
    if c > 0 and 2 * c >= batch_size:
        raise ValueError(
            f"c={c} clips every value of a batch of {batch_size}: use c < B/2 "
            f"(at most {(batch_size - 1) // 2}) or a larger batch"
        )
    return c


def percentile_for_c(c: int, batch_size: int) -> tuple[float, float]:
    """The (low, high) percentiles whose numpy "nearest" values are sorted indices c, B-1-c."""
    check_c(c, batch_size)
    if batch_size == 1:
        return 0.0, 100.0
    return 100.0 * c / (batch_size - 1), 100.0 * (batch_size - 1 - c) / (batch_size - 1)


def c_for_percentile(q: float, batch_size: int) -> int:
    """The ``c`` that a low percentile ``q`` (0..50) with "nearest" interpolation amounts to.

    numpy's "nearest" rounds ``q / 100 * (B - 1)`` half to even; this repeats that rule.
    """
    if not 0.0 <= q <= 50.0:
        raise ValueError(f"q must be a low percentile in [0, 50], got {q}")
    return int(round(q / 100.0 * (batch_size - 1)))


def winsorized_mean_rows(x: Tensor, c: int) -> Tensor:
    """Winsorized mean over dim 0 of ``x`` (B, n) -> (n,); see the module docstring.

    ``c = 0`` returns ``x.mean(0)`` exactly. For ``c >= 1`` every column is computed
    independently of the others (sums are pairwise trees of elementwise adds), so splitting
    the columns (``column_slices``) gives bitwise the same result.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (B, n), got shape {tuple(x.shape)}; reshape(B, -1) first")
    c = check_c(c, x.shape[0])
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    if c == 0:
        return x.mean(0)
    if c + 1 <= TREE_MAX_K:
        return _tournament_mean(x, c)
    return _sorted_mean(x, c)


def row_sum(x: Tensor) -> Tensor:
    """Sum over dim 0 by a pairwise tree of elementwise adds: each column's rounding is the
    same whatever the other columns are (``x.sum(0)`` is not), so column chunks agree bitwise."""
    while x.shape[0] > 1:
        r = x.shape[0]
        half = x[0 : r - 1 : 2] + x[1::2]
        if r % 2:  # fold the unpaired last row into the last pair (no copy of the rest)
            half[-1] += x[-1]
        x = half
    return x[0]


def _sorted_mean(x: Tensor, c: int) -> Tensor:
    s = x.sort(0).values  # (B, n)
    b = x.shape[0]
    return (row_sum(s[c : b - c]) + c * (s[c] + s[b - 1 - c])) / b


def _tournament_mean(x: Tensor, c: int) -> Tensor:
    b, n = x.shape
    width = max(1, BLOCK_ELEMENTS // b)
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for a in range(0, n, width):
        blk = x[:, a : a + width]
        top, bot = _extremes(blk, c + 1)  # c+1 largest (desc) and smallest (asc), each (w,)
        s = row_sum(blk)
        for j in range(c):
            s -= top[j] + bot[j]
        s += c * (top[c] + bot[c])
        out[a : a + width] = s / b
    return out


def _extremes(x: Tensor, k: int) -> tuple[list[Tensor], list[Tensor]]:
    """The k largest (descending) and k smallest (ascending) values of each column of x (B, w).

    A tournament: each level merges pairs of sorted lists (rows 2r and 2r+1) into the top-k of
    their union with elementwise max/min, halving the rows; ties are kept as values.
    """
    rows = x.shape[0]
    even = rows - rows % 2
    a, b = x[0:even:2], x[1:even:2]
    hi, lo = torch.maximum(a, b), torch.minimum(a, b)  # (B//2, w): sorted pairs
    left = [x[-1:]] if rows % 2 else []  # an unpaired row is merged in at the end (1 row wide)
    top = _reduce([hi, lo][:k], k, torch.maximum, torch.minimum, list(left))
    bot = _reduce([lo, hi][:k], k, torch.minimum, torch.maximum, list(left))
    return [t[0] for t in top], [t[0] for t in bot]


def _reduce(
    lists: list[Tensor], k: int, better: _Op, worse: _Op, leftovers: list[Tensor]
) -> list[Tensor]:
    """Merge row pairs until one row is left; ``lists[j]`` (r, w) is the j-th best per row.

    Unpaired rows of odd levels are set aside and merged into the final single row, so no
    level copies its tensors; ``leftovers`` holds single-row lists to merge at the end."""
    carried = [[t] for t in leftovers]
    while lists[0].shape[0] > 1:
        r = lists[0].shape[0]
        e = r - r % 2
        if r % 2:
            carried.append([t[-1:] for t in lists])
        lists = _merge([t[0:e:2] for t in lists], [t[1:e:2] for t in lists], k, better, worse)
    for extra in carried:
        lists = _merge(lists, extra, k, better, worse)
    return lists


def _merge(a: list[Tensor], b: list[Tensor], k: int, better: _Op, worse: _Op) -> list[Tensor]:
    """Top-k of the union of two sorted lists: C_j = best over i of worse(A_{i-1}, B_{j-i}).

    With A_{-1} = B_{-1} = "better than anything": C_j = best(A_j, B_j, worse(A_i, B_{j-1-i})).
    """
    la, lb = len(a), len(b)
    out = []
    for j in range(min(k, la + lb)):
        terms = [t for t in (a[j] if j < la else None, b[j] if j < lb else None) if t is not None]
        for i in range(j):
            if i < la and j - 1 - i < lb:
                terms.append(worse(a[i], b[j - 1 - i]))
        acc = terms[0]
        for t in terms[1:]:
            acc = better(acc, t)
        out.append(acc)
    return out


def top_values(x: Tensor, k: int, largest: bool = True,
               workspace: dict | None = None) -> list[Tensor]:
    """The k largest (or smallest) values of each column of ``x`` (r, w), best first, as a
    list of min(k, r) tensors (w,); ties are kept as values (a multiset).

    Pairs recursion: with hi/lo = elementwise max/min of row pairs (i, h + i), at most k//2
    of the top k come from lo (each such value's partner in hi ranks above it), so
    ``top_k(x) = merge(top_k(hi), top_{k//2}(lo))`` and ``top_1`` is one ``amax``. Only
    elementwise max/min and column reductions: no sort, no indices (both are slow along
    dim 0 on CPU). Cost about (1 + log2 k) passes over x plus O(k^2) (w,)-sized merges.
    ``workspace``: a dict to reuse across calls for the hi/lo buffers (fresh large buffers
    cost a page fault per 4 KiB, as much as the arithmetic).
    """
    ops = (torch.maximum, torch.minimum) if largest else (torch.minimum, torch.maximum)
    return _top(x, k, ops, largest, {} if workspace is None else workspace, 0)


def _buffer(ws: dict, key: tuple, rows: int, like: Tensor) -> Tensor:
    n = rows * like.shape[1]
    buf = ws.get(key)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype:
        buf = ws[key] = like.new_empty(n)
    return buf[:n].view(rows, like.shape[1])


def _top(x: Tensor, k: int, ops: tuple[_Op, _Op], largest: bool, ws: dict,
         depth: int) -> list[Tensor]:
    better, worse = ops
    r = x.shape[0]
    if k == 1 or r == 1:
        return [x.amax(0) if largest else x.amin(0)]
    if r == 2:
        return [better(x[0], x[1]), worse(x[0], x[1])][:k]
    if k == 2:
        return _top2(x, ops, largest, ws, depth)
    h = r // 2
    a, b = x[:h], x[h:2 * h]  # pair row i with row h + i: two contiguous slabs (fast)
    # buffers per depth: a node's hi/lo live while its children (depth + 1) run
    hi = better(a, b, out=_buffer(ws, (depth, 0), h, x))
    lo = worse(a, b, out=_buffer(ws, (depth, 1), h, x))
    out = _merge(_top(hi, k, ops, largest, ws, depth + 1),
                 _top(lo, k // 2, ops, largest, ws, depth + 1), k, better, worse)
    return _merge(out, [x[-1]], k, better, worse) if r % 2 else out


def _top2(x: Tensor, ops: tuple[_Op, _Op], largest: bool, ws: dict, depth: int
          ) -> list[Tensor]:
    """k = 2 without recursion: second(S) = max over the hi-chain levels of amax(lo), then
    the odd rows set aside on the way are merged in (about half the ops of ``_top``)."""
    better, worse = ops
    carried, second = [], None
    while x.shape[0] > 1:
        r, h = x.shape[0], x.shape[0] // 2
        if r % 2:
            carried.append(x[-1])
        a, b = x[:h], x[h:2 * h]
        lo = worse(a, b, out=_buffer(ws, (depth, 1), h, x))
        x = better(a, b, out=_buffer(ws, (depth, 0), h, x))
        m = lo.amax(0) if largest else lo.amin(0)
        second = m if second is None else better(second, m, out=second)
        depth += 1
    first = x[0].clone()  # x is a workspace buffer that later calls overwrite
    for z in carried:
        second, first = better(second, worse(first, z)), better(first, z)
    return [first, second]


def _both_ends(x: Tensor, k: int, ws: dict) -> tuple[list[Tensor], list[Tensor]]:
    """(k largest, k smallest) per column, sharing the first (largest) pairs level."""
    r = x.shape[0]
    if r < 4 or k == 1:
        return top_values(x, k, True, ws), top_values(x, k, False, ws)
    h = r // 2
    a, b = x[:h], x[h:2 * h]
    hi = torch.maximum(a, b, out=_buffer(ws, ("root", 0), h, x))
    lo = torch.minimum(a, b, out=_buffer(ws, ("root", 1), h, x))
    mx, mn = (torch.maximum, torch.minimum), (torch.minimum, torch.maximum)
    top = _merge(_top(hi, k, mx, True, ws, 0), _top(lo, k // 2, mx, True, ws, 0), k, *mx)
    bot = _merge(_top(lo, k, mn, False, ws, 0), _top(hi, k // 2, mn, False, ws, 0), k, *mn)
    if r % 2:
        top, bot = _merge(top, [x[-1]], k, *mx), _merge(bot, [x[-1]], k, *mn)
    return top, bot


def extremes_correction(x: Tensor, c: int, workspace: dict | None = None) -> Tensor:
    """``winsorized_mean(x, c) * B - x.sum(0)`` for x (B, w) -> (w,).

    With t_j / b_j the j-th largest / smallest value of a column (0-based), winsorizing
    replaces t_0..t_{c-1} by t_c and b_0..b_{c-1} by b_c, so the column sum changes by
    ``sum_{j<c} (t_c - t_j) + (b_c - b_j)``. Callers add the plain sum (often free, e.g.
    from a factored gradient) and divide by B. ``c = 0`` gives zeros. ``workspace``: see
    :func:`top_values` (pass the same dict for every block)."""
    if c == 0:
        return x.new_zeros(x.shape[1])
    top, bot = _both_ends(x, c + 1, {} if workspace is None else workspace)
    out = c * (top[c] + bot[c])
    for j in range(c):
        out -= top[j] + bot[j]
    return out


def column_slices(
    num_rows: int, num_cols: int, element_size: int, memory_budget_bytes: int
) -> list[slice]:
    """Split ``num_cols`` columns so one (num_rows, width) chunk plus the kernel's working set
    (about one more chunk) stays under ``memory_budget_bytes``; at least one column per chunk.

    >>> column_slices(100, 10, 4, 4000)
    [slice(0, 5, None), slice(5, 10, None)]
    """
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    per_col = 2 * num_rows * element_size
    width = max(1, min(num_cols, memory_budget_bytes // per_col))
    return [slice(a, min(a + width, num_cols)) for a in range(0, num_cols, width)]


def winsorized_mean_chunked(x: Tensor, c: int, memory_budget_bytes: int) -> Tensor:
    """Winsorized mean over dim 0 of x (B, n) -> (n,), over column chunks from
    ``column_slices``; bitwise independent of the chunking.

    With the compiled kernel (CPU, float32/64): ``(row_sum + kernel correction) / B`` per
    chunk, equal to ``winsorized_mean_rows`` up to rounding; otherwise
    ``winsorized_mean_rows`` per chunk (bitwise equal to it unchunked). ``c = 0`` needs no
    extra memory and is ``x.mean(0)`` unchunked, exactly."""
    if x.dim() != 2:
        raise ValueError(f"x must be (B, n), got shape {tuple(x.shape)}; reshape(B, -1) first")
    if check_c(c, x.shape[0]) == 0:
        return x.mean(0)
    if not x.is_floating_point():
        raise TypeError(f"x must be floating point, got {x.dtype}")
    slices = column_slices(x.shape[0], x.shape[1], x.element_size(), memory_budget_bytes)
    if kernel.usable(x):
        b = x.shape[0]
        return torch.cat([(row_sum(x[:, s]) + kernel.column_corrections(x[:, s], c)) / b
                          for s in slices])
    return torch.cat([winsorized_mean_rows(x[:, s], c) for s in slices])
