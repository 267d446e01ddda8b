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

import torch
from torch import Tensor

from ._factors import chunks
from ._paramgrads import (
    FlatCache,
    ParamGrads,
    _flat,
    bookkeeps,
    inner,
    rows_in_workspace,
    self_grams,
)


class BatchGrads:
    """Per-example gradients of a batch, held factored.

    >>> grads = cap.backward(losses)          # doctest: +SKIP
    >>> grads.norms().shape, grads.gram().shape, grads.names  # doctest: +SKIP
    (torch.Size([B]), torch.Size([B, B]), ['0.weight', '0.bias', ...])
    """

    def __init__(self, params: list[ParamGrads], batch_shape: tuple[int, ...],
                 usage: dict | None = None) -> None:
        self._params = {pg.name: pg for pg in params}
        # what this batch is asked for, shared with its capture: a loop asks the same
        # every step, and book-keeping pays only when a Gram is wanted (see ``_books``)
        self._usage = usage if usage is not None else {}
        self._usage.setdefault("expect_gram", True)
        self._usage["gram"] = False
        self.batch_shape = tuple(batch_shape)
        self._grams: dict[str, Tensor] | None = None  # name -> (N, N) flat, computed once
        self._gram_total: Tensor | None = None
        self._sq: dict[str, Tensor] | None = None  # name -> (N,) squared norms
        self._flat: FlatCache = {}  # name -> (N, P) materialised per-example gradients, kept
        self._book: dict[str, dict] = {}  # name -> its sum, squared norms, Gram (see _booked)
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
                self._sq = {k: self._booked(pg)["sq"] if self._books(pg) else inner(
                    pg, pg, diag=True, cache_a=self._flat, cache_b=self._flat)
                    for k, pg in self._params.items()}
        return self._sq

    def _layer_grams(self) -> dict[str, Tensor]:
        """name -> (N, N) per-layer Gram, computed on first use and kept (read-only)."""
        self._usage["gram"] = True
        if self._grams is None:
            booked = {k: self._booked(pg)["gram"] for k, pg in self._params.items()
                      if self._books(pg)}
            booked = {k: g for k, g in booked.items() if g is not None}  # None: norms only
            rest = {k: pg for k, pg in self._params.items() if k not in booked}
            grams = {**booked, **self_grams(rest, self._flat)}
            self._grams = {k: grams[k] for k in self._params}
        return self._grams

    def _wants_gram(self) -> bool:
        """A Gram asked for already, or by the previous batch of the same capture (a loop
        asks the same every step)."""
        return self._usage["gram"] or self._usage["expect_gram"]

    def _books(self, pg: ParamGrads) -> bool:
        """Book-keep ``pg`` (see ``bookkeeps``): where the Gram (or, in a norms-only loop,
        the norms) would build its per-example gradients anyway."""
        if pg.name in self._book:
            return True
        return len(self.batch_shape) == 1 and bookkeeps(pg, diag=not self._wants_gram())

    def _booked(self, pg: ParamGrads) -> dict[str, Tensor | None]:
        """A book-kept parameter's sum (param.shape), squared norms (N,) and, where a Gram is
        wanted, Gram (N, N), from ONE build of its per-example gradients in the workspace
        (see ``bookkeeps``); computed once."""
        if pg.name not in self._book:
            rows = rows_in_workspace(pg)  # (N, P), valid until the next use of the workspace
            gram = rows @ rows.T if self._wants_gram() else None
            # squared norms: the Gram's diagonal where it is built, else one pass over the rows
            sq = torch.linalg.vector_norm(rows, dim=1).square() if gram is None else \
                gram.diagonal()
            self._book[pg.name] = {"sum": rows.sum(0).reshape(pg.shape), "sq": sq, "gram": gram}
        return self._book[pg.name]

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
        self._usage["gram"] = True
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

    def sum(self, scale: float = 1.0) -> dict[str, Tensor]:
        """sum_n g_n per parameter: exactly autograd of ``(scale * losses).sum()``; to put it
        in ``param.grad``, use :meth:`write_grad`.

        mode='output': dict name -> (K, *shape), the gradient of each summed output.
        ``scale`` (mode='loss'): returns ``scale * sum_n g_n`` (1/N: the mean gradient) at no
        extra cost (it multiplies the smaller factor, not the P results).
        """
        if len(self.batch_shape) > 1:
            k = self.batch_shape[1]
            return {name: pg.materialize().reshape(-1, k, *pg.shape).sum(0).detach()
                    for name, pg in self._params.items()}
        return {name: self._total(pg, scale).detach() for name, pg in self._params.items()}

    def per_param(self) -> dict[str, ParamGrads]:
        """The per-parameter factored gradients, name -> :class:`ParamGrads` (read-only), for
        algorithms that need coordinates rather than inner products (e.g. the winsorized
        mean of ``graddyn.interventions``)."""
        return dict(self._params)

    @torch.no_grad()
    def write_grad(self, scale: float = 1.0, overwrite: bool = False) -> None:
        """``param.grad`` gets ``scale * sum_n g_n`` (mode='loss'): added, like ``backward()``,
        or with ``overwrite=True`` written over what is there (like ``zero_grad(set_to_none=
        False)`` then ``backward()``). Where ``param.grad`` exists it is updated in place by
        the factors' matmul itself (``addmm`` into it): no new P-sized buffer, whose fresh pages
        the OS must zero every step (``docs/benchmarks_overhead.md``); only a missing one is
        allocated.
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
            if fresh or self._books(pg):
                total = self._total(pg, scale).to(p.dtype)
                if fresh or overwrite:
                    p.grad = total
                else:
                    p.grad.add_(total)
            else:
                pg.total_into(p.grad, scale, accumulate=not overwrite)

    def _total(self, pg: ParamGrads, scale: float) -> Tensor:
        """scale * sum_n g_n; from the per-example rows where the Gram builds them anyway
        (book-keeping, see ``_booked``), else from the factors."""
        if self._books(pg):
            total = self._booked(pg)["sum"]
            return total * scale if scale != 1.0 else total.clone()
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
