"""Per-coordinate robust means over the example axis: the reference of winsorized SGD.

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

This module is the reference, plain PyTorch (any device, any float dtype): each column is
sorted. The single fast path is the compiled kernel (``graddyn._kernels.winsorize``, numba,
CPU float32/64; ``docs/benchmarks_winsorize.md``): ``winsorized_mean_chunked`` and
``BatchGrads``' ``winsorized_mean`` use it when it is usable and this module otherwise
(``graddyn._kernels.ENABLED = False`` forces that). Sums over rows are pairwise trees of
elementwise adds, so each column's result does not depend on the other columns (chunking is
bitwise exact).

>>> x = torch.tensor([[0.0], [1.0], [2.0], [100.0]])
>>> winsorized_mean_rows(x, 1)
tensor([1.5000])
"""

from __future__ import annotations

import torch

from graddyn._kernels import winsorize as kernel

Tensor = torch.Tensor


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
    s = x.sort(0).values  # (B, n) ascending per column
    b = x.shape[0]
    return (row_sum(s[c : b - c]) + c * (s[c] + s[b - 1 - c])) / b


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


def extremes_correction(x: Tensor, c: int) -> Tensor:
    """``winsorized_mean(x, c) * B - x.sum(0)`` for x (B, w) -> (w,).

    With t_j / b_j the j-th largest / smallest value of a column (0-based), winsorizing
    replaces t_0..t_{c-1} by t_c and b_0..b_{c-1} by b_c, so the column sum changes by
    ``sum_{j<c} (t_c - t_j) + (b_c - b_j)``. Callers add the plain sum (often free, e.g.
    from a factored gradient) and divide by B. ``c = 0`` gives zeros."""
    if c == 0:
        return x.new_zeros(x.shape[1])
    s = x.sort(0).values  # (B, w) ascending: b_j = s[j], t_j = s[B - 1 - j]
    b = x.shape[0]
    out = c * (s[b - 1 - c] + s[c])
    for j in range(c):
        out -= s[b - 1 - j] + s[j]
    return out


def column_slices(
    num_rows: int, num_cols: int, element_size: int, memory_budget_bytes: int
) -> list[slice]:
    """Split ``num_cols`` columns so one (num_rows, width) chunk plus the kernel's working set
    (about one more chunk) stays under ``memory_budget_bytes``; at least one column per chunk.
    The sorting reference needs more (sorted values and int64 indices: about three chunks in
    float32), so without the kernel the budget is exceeded by about that factor.

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
