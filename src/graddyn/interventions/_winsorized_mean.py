"""The winsorized mean of a batch's per-example gradients, from the engine's factored form.

Winsorized SGD (Chatterjee, ICLR 2020) clips, per coordinate, the c largest and c smallest
per-example values before averaging. This works on a :class:`graddyn.pergrad.BatchGrads`
(its per-parameter factors, ``BatchGrads.per_param()``) so that Linear layers never
materialise per-example gradients; the reference is ``graddyn.reference.DenseBatchGrads``'s
``winsorized_mean`` on materialised gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from graddyn._kernels import winsorize as kernel
from graddyn._robust import check_c, extremes_correction, row_sum
from graddyn.pergrad import BatchGrads
from graddyn.pergrad._paramgrads import ParamGrads


def winsorized_mean(grads: BatchGrads, c: int, memory_budget_bytes: int = 1 << 28
                    ) -> dict[str, Tensor]:
    """Per coordinate, the winsorized mean over examples (clip the c largest and c
    smallest per-example values) -> dict name -> param.shape (Chatterjee, ICLR 2020).

    Formula: ``(sum_n g_n + extremes_correction) / N`` (see ``graddyn._robust``); the
    correction needs only the c + 1 largest and smallest values per coordinate. Rows
    include ``scale`` from backward. Per parameter:

    - a Linear layer on (N, in) input (g_n = outer(G[n], X[n])), with the compiled kernel
      (``graddyn._kernels.winsorize``, numba): the sum is ``total()`` (one matmul on the
      factors) and the kernel streams G[n, i] * X[n, :] per output row, skipping the
      examples whose factor entry is 0 (ReLU-dead units, zero pixels; exact). Nothing is
      materialised; extra memory is the (P,) result.
    - anything else (conv, sequences, biases, dense fallback grads, or no kernel): row
      blocks (N, rows x cols) of at most min(``memory_budget_bytes`` / 2,
      ``BLOCK_BYTES``) (at least one row) are materialised into one reused buffer; the
      sum is taken from them (one add pass) and the correction by the kernel, or by the
      sorting reference ``graddyn._robust.extremes_correction`` (numba missing, kernels
      switched off, not CPU float32/64).

    Cost of the correction: about 4 (c + 1) vectorised min/max per value with the kernel
    (on ``torch.get_num_threads()`` threads), a sort per coordinate without it; measured in
    ``docs/benchmarks_winsorize.md``. Kernel and reference agree to rounding. Given the
    same values, both are bitwise independent of blocks and threads; only the materialising
    ``bmm`` (conv, sequences) may round differently for another block shape.
    """
    if len(grads.batch_shape) > 1:
        raise ValueError("winsorized_mean is defined for mode='loss' only.")
    if memory_budget_bytes <= 0:
        raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
    block = min(max(memory_budget_bytes // 2, 1), BLOCK_BYTES)  # + workspace ~ one block
    return {k: _winsorized(pg, c, block).detach() for k, pg in grads.per_param().items()}


BLOCK_BYTES = 1 << 22
"""Largest block of per-example values materialised at once: big enough to amortise the
per-op overhead of the kernel's (w,)-sized merges, small enough to stay in cache (the best of
1-32 MiB on the 3x256 MLP, B = 100: ``docs/benchmarks_winsorize.md``)."""


@torch.no_grad()  # fallback (torch.func) gradients may carry a graph: not needed here
def _winsorized(pg: ParamGrads, c: int, budget: int) -> Tensor:
    n = pg.n
    check_c(c, n)
    if c == 0:
        return (pg.total() / n).reshape(pg.shape)
    outer = _outer_factors(pg)
    if outer is not None and kernel.usable(*outer):
        total = pg.total().reshape(-1)  # (P,) in the matrix view's row-major order
        corr = kernel.outer_corrections(*outer, c).reshape(-1)
    else:
        total, corr = _block_sums_and_corrections(pg, c, budget)
    return ((total + corr) / n).reshape(pg.shape)


def _outer_factors(pg: ParamGrads) -> tuple[Tensor, Tensor] | None:
    """(G (N, rows), X (N, cols)) when every per-example gradient is exactly one outer product
    g_n = G[n] (x) X[n] (a Linear layer on 2-D input: one dense factor, Gb = T = 1)."""
    if pg.dense is not None or len(pg.factors) != 1:
        return None
    f = pg.factors[0]
    if f.index or f.layout[0] != 1 or f.t != 1:
        return None
    return f.left[:, 0, 0], f.right[:, 0, 0]


def _block_sums_and_corrections(pg: ParamGrads, c: int, budget: int
                                ) -> tuple[Tensor, Tensor]:
    """(plain sum, extremes correction), each (P,) in the matrix view's row-major order, from
    row blocks (N, rows x cols) materialised into one buffer of at most ``budget`` bytes: the
    compiled kernel per block, else the sorting reference. The sum is taken from the blocks
    (one add pass) rather than from the factors: for a conv layer ``total()`` costs as many
    flops as materialising, and the blocks are materialised anyway."""
    n = pg.n
    rows, cols = pg.matrix_shape()
    step = max(1, budget // max(n * cols * pg.param.element_size(), 1))
    src = pg.dense if pg.dense is not None else pg.factors[0].right if pg.factors else pg.param
    sums = src.new_empty(rows * cols)
    corr = torch.empty_like(sums)
    buf = src.new_empty(n * min(step, rows) * cols)  # reused by every block
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        block = pg.rows_into(r0, r1, buf)  # (N, (r1 - r0) cols)
        sums[r0 * cols:r1 * cols] = row_sum(block)
        if kernel.usable(block):
            corr[r0 * cols:r1 * cols] = kernel.column_corrections(block, c)
        else:
            corr[r0 * cols:r1 * cols] = extremes_correction(block, c)
    return sums, corr
