"""``BatchGrads``: what one captured backward gives; ask only for what you need.

Rows are examples (mode='loss', batch shape (B,)) or (example, output) pairs in mode='output'
(batch shape (B, K), row b K + k). Per-parameter products choose ghost or materialised
forms by the cost model in ``_cost.py``. All results are detached tensors.

Instruments often ask the same ``BatchGrads`` for its Gram several times (coherence,
confusion, stiffness, group split: one each per probe), so the per-layer Grams are computed
once and memoised; ``norms()`` then reads their diagonals (free) instead of a second pass.
Callers get copies (N x N, cheap), so mutating a result never corrupts the cache.

``cross_gram`` against one batch from many others (TracIn: the test batch against every
training batch) keeps each side's *materialised* per-example gradients (the layers where the
cost model materialises, e.g. convolutions; up to ``FLAT_CACHE_BYTES`` per batch), so they
are built once per batch, not once per call.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from .. import _robust_kernel as kernel
from .._gram import pairs_from_grams
from .._robust import check_c, extremes_correction, row_sum
from ._factors import chunks
from ._paramgrads import FlatCache, ParamGrads, _flat, inner, materializes, self_grams


class BatchGrads:
    """Per-example gradients of a batch, held factored.

    >>> grads = cap.backward(losses)          # doctest: +SKIP
    >>> grads.norms().shape, grads.gram().shape, grads.names  # doctest: +SKIP
    (torch.Size([B]), torch.Size([B, B]), ['0.weight', '0.bias', ...])
    """

    def __init__(self, params: list[ParamGrads], batch_shape: tuple[int, ...]) -> None:
        self._params = {pg.name: pg for pg in params}
        self.batch_shape = tuple(batch_shape)
        self._grams: dict[str, Tensor] | None = None  # name -> (N, N) flat, computed once
        self._gram_total: Tensor | None = None
        self._host: tuple[np.ndarray, np.ndarray] | None = None  # Gram, cosines (NumPy)
        self._sq: dict[str, Tensor] | None = None  # name -> (N,) squared norms
        self._flat: FlatCache = {}  # name -> (N, P) materialised per-example gradients, kept
        self.exchange = None  # capture(process_group=...): what gathering the ranks' cost

    @property
    def names(self) -> list[str]:
        """Captured parameter names, as in ``model.named_parameters()``."""
        return list(self._params)

    def _out(self, t: Tensor, *shapes: tuple[int, ...]) -> Tensor:
        return t.detach().reshape(*[d for s in shapes for d in s])

    def norms(self, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """||g_n|| over all captured parameters -> batch_shape (per_layer: dict name -> ...).

        Cost per parameter: min(ghost N T^2 (p+q), materialised N T p q); free (the Gram's
        diagonal) once ``gram()`` was called."""
        sq = self._squared_norms()
        if per_layer:
            return {k: self._out(v.clamp_min(0).sqrt(), self.batch_shape) for k, v in sq.items()}
        return self._out(sum(sq.values()).clamp_min(0).sqrt(), self.batch_shape)

    def _squared_norms(self) -> dict[str, Tensor]:
        if self._sq is None:
            if self._grams is not None:
                self._sq = {k: g.diagonal() for k, g in self._grams.items()}
            else:
                self._sq = {k: inner(pg, pg, diag=True, cache_a=self._flat, cache_b=self._flat)
                            for k, pg in self._params.items()}
        return self._sq

    def _layer_grams(self) -> dict[str, Tensor]:
        """name -> (N, N) per-layer Gram, computed on first use and kept (read-only)."""
        if self._grams is None:
            self._grams = self_grams(self._params, self._flat)
        return self._grams

    def gram(self, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        """G[i, j] = <g_i, g_j> -> batch_shape x batch_shape, e.g. (B, B); (B, K, B, K) in
        mode='output' (the empirical NTK). per_layer: dict parameter name -> same shape.

        Cost: per parameter min(ghost N^2 T^2 (p+q), materialise N T p q + N^2 p q) on the
        first call; later calls (and ``norms()``) reuse it and return fresh copies."""
        shapes = (self.batch_shape, self.batch_shape)
        grams = self._layer_grams()
        if per_layer:
            return {k: self._out(v, *shapes).clone() for k, v in grams.items()}
        if self._gram_total is None:
            self._gram_total = sum(grams.values())
        return self._out(self._gram_total, *shapes).clone()

    def host_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(Gram, cosine matrix) as read-only (B, B) float64 NumPy arrays (mode='loss'),
        memoised: the instruments' O(B^2) statistics run on the host (see ``graddyn._gram``).
        The per-layer Grams are summed in float64 there."""
        if len(self.batch_shape) > 1:
            raise ValueError("host_pairs() is defined for mode='loss' only.")
        if self._host is None:
            self._host = pairs_from_grams(list(self._layer_grams().values()))
        return self._host

    def ntk(self) -> Tensor:
        """Empirical NTK of mode='output': Theta[b, k, c, l] = <df_k(x_b), df_l(x_c)>."""
        return self.gram()

    def cross_gram(self, other: BatchGrads, per_layer: bool = False) -> Tensor | dict:
        """C[i, j] = <g_i, h_j> against another batch -> (B, C) (shapes: self x other).

        ``other``: a BatchGrads over the same parameter names (e.g. a test batch, for
        TracIn), or any object with ``materialize()`` (e.g. ``reference.DenseBatchGrads``)."""
        if set(other.names) != set(self.names):
            raise ValueError(f"cross_gram needs the same parameters on both sides; got "
                             f"{self.names} and {other.names}.")
        if other is self:
            return self.gram(per_layer)
        shapes = (self.batch_shape, other.batch_shape)
        if isinstance(other, BatchGrads):
            res = {k: inner(pg, other._params[k], cache_a=self._flat, cache_b=other._flat)
                   for k, pg in self._params.items()}
        else:
            dense = other.materialize()
            res = {}
            for k, pg in self._params.items():
                h = dense[k].reshape(-1, pg.param.numel())
                res[k] = _flat(pg, self._flat) @ h.T
        if per_layer:
            return {k: self._out(v, *shapes) for k, v in res.items()}
        return self._out(sum(res.values()), *shapes)

    def sum(self, write_to_grad: bool = False, scale: float = 1.0) -> dict[str, Tensor]:
        """sum_n g_n per parameter: exactly autograd of ``(scale * losses).sum()``.

        mode='output': dict name -> (K, *shape), the gradient of each summed output.
        ``write_to_grad=True`` (mode='loss') adds it into ``param.grad`` like ``backward()``.
        ``scale`` (mode='loss'): returns ``scale * sum_n g_n`` (1/N: the mean gradient) at no
        extra cost (it multiplies the smaller factor, not the P results).
        """
        if len(self.batch_shape) > 1:
            if write_to_grad:
                raise ValueError("write_to_grad is only defined for mode='loss'.")
            k = self.batch_shape[1]
            return {name: pg.materialize().reshape(-1, k, *pg.shape).sum(0).detach()
                    for name, pg in self._params.items()}
        out = {name: self._total(pg, scale).detach() for name, pg in self._params.items()}
        if write_to_grad:
            for name, pg in self._params.items():
                p = pg.param
                # a private copy only when the dtype matches (``.to`` already copies otherwise),
                # so that the returned tensors never alias ``p.grad``
                g = out[name].to(p.dtype)
                g = g.clone() if g is out[name] else g
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        return out

    @torch.no_grad()
    def write_grad(self, scale: float = 1.0, overwrite: bool = False) -> None:
        """``param.grad`` gets ``scale * sum_n g_n`` (mode='loss'): added, like ``backward()``,
        or with ``overwrite=True`` written over what is there (like ``zero_grad(set_to_none=
        False)`` then ``backward()``). Where ``param.grad`` exists it is updated in place by
        the factors' matmul itself (``addmm`` into it): no new P-sized buffer, whose fresh pages
        the OS must zero (~0.2 ms per 6 MB here, every step); only a missing one is allocated.
        """
        if len(self.batch_shape) > 1:
            raise ValueError("write_grad is only defined for mode='loss'.")
        for pg in self._params.values():
            p = pg.param
            if not (pg.factors or pg.dense is not None):  # not used by this batch's forward
                if overwrite:
                    p.grad = None  # as after zero_grad(set_to_none=True) + backward()
                continue
            fresh = p.grad is None or p.grad.shape != p.shape or p.grad.dtype != p.dtype
            if fresh or materializes(pg, self._flat):
                total = self._total(pg, scale).to(p.dtype)
                if fresh or overwrite:
                    p.grad = total
                else:
                    p.grad.add_(total)
            else:
                pg.total_into(p.grad, scale, accumulate=not overwrite)

    def _total(self, pg: ParamGrads, scale: float) -> Tensor:
        """scale * sum_n g_n; from the materialised rows where the Gram materialises them
        anyway (kept for it: book-keeping), else from the factors."""
        if materializes(pg, self._flat):
            return (_flat(pg, self._flat).sum(0) * scale).reshape(pg.shape)
        return pg.total(scale)

    def materialize(self, chunk_size: int | None = None
                    ) -> dict[str, Tensor] | Iterator[dict[str, Tensor]]:
        """Per-example gradients dict name -> (*batch_shape, *param.shape).

        With ``chunk_size``: an iterator of such dicts over consecutive row chunks (rows =
        examples; (example, output) pairs in mode='output'), each (chunk, *param.shape).
        Memory: rows x P.
        """
        if chunk_size is None:
            return {k: pg.materialize().reshape(*self.batch_shape, *pg.shape).detach()
                    for k, pg in self._params.items()}
        return self._chunks(chunk_size)

    def _chunks(self, chunk_size: int) -> Iterator[dict[str, Tensor]]:
        n = next(iter(self._params.values())).n
        for sl in chunks(n, chunk_size):
            yield {k: pg.materialize(sl).detach() for k, pg in self._params.items()}

    def winsorized_mean(self, c: int, memory_budget_bytes: int = 1 << 28
                        ) -> dict[str, Tensor]:
        """Per coordinate, the winsorized mean over examples (clip the c largest and c
        smallest per-example values) -> dict name -> param.shape (Chatterjee, ICLR 2020).

        Formula: ``(sum_n g_n + extremes_correction) / N`` (see ``graddyn._robust``); the
        correction needs only the c + 1 largest and smallest values per coordinate. Rows
        include ``scale`` from backward. Per parameter:

        - a Linear layer on (N, in) input (g_n = outer(G[n], X[n])), with the compiled kernel
          (``graddyn._robust_kernel``, numba): the sum is ``total()`` (one matmul on the
          factors) and the kernel streams G[n, i] * X[n, :] per output row, skipping the
          examples whose factor entry is 0 (ReLU-dead units, zero pixels; exact). Nothing is
          materialised; extra memory is the (P,) result.
        - anything else (conv, sequences, biases, dense fallback grads, or no kernel): row
          blocks (N, rows x cols) of at most min(``memory_budget_bytes`` / 2,
          ``BLOCK_BYTES``) (at least one row) are materialised into one reused buffer; the
          sum is taken from them (one add pass) and the correction by the kernel, or by the
          eager PyTorch tournament (numba missing, ``GRADDYN_NO_KERNEL=1``, not CPU
          float32/64).

        Cost of the correction: the kernel does about 4 (c + 1) vectorised min/max per value
        (~0.3 ns per value at c = 1, ~1.3 ns at c = 8, float32, one core) on
        ``torch.get_num_threads()`` threads; the eager tournament about (2 + log2(c + 1))
        passes over N x P values plus O(c^2) merges per block (~2.5 and ~10 ns per value).
        Measured training step on the 3x256 MLP (B = 100): 4-10x a plain SGD step at
        c = 1..8 with the kernel, 33-140x without (``docs/benchmarks_winsorize.md``). Kernel
        and eager results agree to rounding. Given the same values, both are bitwise
        independent of blocks and threads; only the materialising ``bmm`` (conv, sequences)
        may round differently for another block shape.
        """
        if len(self.batch_shape) > 1:
            raise ValueError("winsorized_mean is defined for mode='loss' only.")
        if memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
        block = min(max(memory_budget_bytes // 2, 1), BLOCK_BYTES)  # + workspace ~ one block
        return {k: _winsorized(pg, c, block).detach()
                for k, pg in self._params.items()}


BLOCK_BYTES = 1 << 22
"""Largest block of per-example values materialised at once: big enough to amortise the
per-op overhead of the kernel's (w,)-sized merges, small enough to stay in cache (measured
best of 1-32 MiB on the 3x256 MLP, B = 100)."""


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
    compiled kernel per block, else the eager tournament. The sum is taken from the blocks
    (one add pass) rather than from the factors: for a conv layer ``total()`` costs as many
    flops as materialising, and the blocks are materialised anyway."""
    n = pg.n
    rows, cols = pg.matrix_shape()
    step = max(1, budget // max(n * cols * pg.param.element_size(), 1))
    src = pg.dense if pg.dense is not None else pg.factors[0].right if pg.factors else pg.param
    sums = src.new_empty(rows * cols)
    corr, ws = torch.empty_like(sums), {}
    buf = src.new_empty(n * min(step, rows) * cols)  # reused by every block
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        block = pg.rows_into(r0, r1, buf)  # (N, (r1 - r0) cols)
        sums[r0 * cols:r1 * cols] = row_sum(block)
        if kernel.usable(block):
            corr[r0 * cols:r1 * cols] = kernel.column_corrections(block, c)
        else:
            corr[r0 * cols:r1 * cols] = extremes_correction(block, c, ws)
    return sums, corr
