"""Per-example gradients of ONE parameter, held factored (ghost) and/or dense.

A parameter used several times (tied weights, a module called in a loop) has per-example
gradient g_n = sum over uses u of g_n^(u). Uses with the same factor layout are concatenated
along t (exact, see ``Outer.cat``); fallback / closed-form dense uses are added up. Products
of two ``ParamGrads`` therefore contain every cross term <g^(u)_i, h^(v)_j> of the uses.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ._cost import prefer_ghost
from ._factors import Outer, dense_cross, ghost_cross, ghost_diag

STRATEGIES = ("auto", "ghost", "materialize")


@dataclass
class ParamGrads:
    """Per-example gradients (N rows) of one parameter ``name``.

    ``dense``: (N, *shape) or None; ``factors``: at most one dense-left and one id-left
    :class:`Outer` sharing one (Gb, p, q) layout; ``strategy`` in ``STRATEGIES``.
    """

    name: str
    param: nn.Parameter
    n: int
    dense: Tensor | None = None
    factors: list[Outer] = field(default_factory=list)
    strategy: str = "auto"
    compact_ids: tuple | None = field(default=None, repr=False)  # (factor, its compact pair)

    @property
    def shape(self) -> torch.Size:
        return self.param.shape

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the per-example gradients and their products: the parameter's, at least
        float32 (bfloat16/half models and autocast get float32 statistics)."""
        return torch.promote_types(self.param.dtype, torch.float32)

    def add_dense(self, g: Tensor) -> None:
        if g.shape[1:] != self.shape or g.shape[0] != self.n:
            g = g.reshape(self.n, *self.shape)
        g = g if g.dtype == self.dtype else g.to(self.dtype)
        self.dense = g if self.dense is None else self.dense + g

    def add_outer(self, f: Outer) -> None:
        """Add one use; a layout clash with earlier uses is resolved by materialising it.
        Factors in another dtype (bfloat16 under autocast) are cast to ``self.dtype``."""
        dt = self.dtype
        if f.dtype != dt or (not f.index and f.left.dtype != dt):
            f = Outer(f.left if f.index else f.left.to(dt), f.right.to(dt), f.p)
        for k, old in enumerate(self.factors):
            if old.layout != f.layout:
                self.add_dense(f.materialize())
                return
            if old.index == f.index:
                self.factors[k] = old.cat(f)
                return
        self.factors.append(f)

    # --- views --------------------------------------------------------------------------
    def matrix_shape(self) -> tuple[int, int]:
        """(rows, cols) of the 2-D view used for row chunks (the factors' (Gb p, q))."""
        if self.factors:
            gb, p, q = self.factors[0].layout
            return gb * p, q
        numel = self.param.numel()
        rows = self.shape[0] if len(self.shape) else 1
        return rows, numel // max(rows, 1)

    def materialize(self, sl: slice = slice(None)) -> Tensor:
        """Examples ``sl`` -> (n, *shape); cost n Gb T p q per factor."""
        n = len(range(self.n)[sl])
        out = self.dense[sl] if self.dense is not None else None
        for f in self.factors:
            m = f.rows(sl).materialize().reshape(n, *self.shape)
            out = m if out is None else out + m
        if out is None:
            return self.param.new_zeros(n, *self.shape).detach()
        return out

    def materialize_rows(self, r0: int, r1: int) -> Tensor:
        """Rows r0:r1 of the matrix view for every example -> (N, r1 - r0, cols)."""
        rows, cols = self.matrix_shape()
        out = None
        if self.dense is not None:
            out = self.dense.reshape(self.n, rows, cols)[:, r0:r1]
        for f in self.factors:
            m = f.materialize_rows(r0, r1)
            out = m if out is None else out + m
        if out is None:
            return self.param.new_zeros(self.n, r1 - r0, cols).detach()
        return out

    def rows_into(self, r0: int, r1: int, buf: Tensor) -> Tensor:
        """``materialize_rows(r0, r1)`` flattened to (N, (r1 - r0) cols), written into ``buf``
        (flat, reused across blocks: no fresh pages per block) when the gradient is one dense
        Outer factor with Gb = 1 (Linear): T = 1 is a broadcast product (one pass, no bmm
        with inner size 1), T > 1 one ``bmm``. Other layouts return a new tensor."""
        rows, cols = self.matrix_shape()
        w = (r1 - r0) * cols
        f = self.factors[0] if len(self.factors) == 1 else None
        if self.dense is not None or f is None or f.index or f.layout[0] != 1:
            return self.materialize_rows(r0, r1).reshape(self.n, w)
        out = buf[: self.n * w].view(self.n, r1 - r0, cols)
        left, right = f.left[:, 0, :, r0:r1], f.right[:, 0]  # (N, T, r), (N, T, q)
        if f.t == 1:
            torch.mul(left[:, 0, :, None], right[:, 0, None, :], out=out)  # (N,r,1)*(N,1,q)
        else:
            torch.bmm(left.transpose(1, 2), right, out=out)
        return out.view(self.n, w)

    def total(self, scale: float = 1.0) -> Tensor:
        """scale * sum_n g_n -> shape; what autograd gives for the (scaled) summed loss.

        ``scale`` multiplies the smaller factor (N x min(p, q) numbers) before the product, so
        the mean gradient (scale = 1/N) costs no extra pass over the P outputs."""
        # Summed in place into the first contribution: a fresh zeros tensor plus an add per
        # use would cost two extra passes over P values (measurable on a 784x2048 layer).
        parts = [] if self.dense is None else [self.dense.sum(0) * scale if scale != 1.0
                                               else self.dense.sum(0)]
        parts += [f.total(scale).reshape(self.shape) for f in self.factors]
        if not parts:
            return self.param.new_zeros(self.shape).detach()
        out = parts[0]
        for extra in parts[1:]:
            out = out + extra
        return out

    def total_into(self, dst: Tensor, scale: float = 1.0, accumulate: bool = True) -> None:
        """``dst`` (param.shape) += (or, without ``accumulate``, =) ``scale * sum_n g_n``, in
        place: MLP-style factors go through one ``addmm`` into ``dst``."""
        parts = list(self.factors)
        if self.dense is not None:
            parts.append(self.dense)
        if not parts:
            if not accumulate:
                dst.zero_()
            return
        for i, part in enumerate(parts):
            add = accumulate or i > 0
            if isinstance(part, Outer) and part.into(dst, scale, add):
                continue
            if (not add and isinstance(part, Tensor) and part.dtype == dst.dtype
                    and dst.is_contiguous()):  # e.g. a bias: two ops straight into dst
                torch.sum(part, 0, out=dst.view(part.shape[1:]))
                if scale != 1.0:
                    dst.mul_(scale)
                continue
            value = (part.sum(0).reshape(self.shape) * scale if isinstance(part, Tensor)
                     else part.total(scale).reshape(self.shape)).to(dst.dtype)
            dst.add_(value) if add else dst.copy_(value)


def _use_ghost(a: ParamGrads, b: ParamGrads, fa: list[Outer], fb: list[Outer],
               diag: bool, built: tuple[bool, bool] = (False, False)) -> bool:
    """Ghost or materialise; ``built``: whether a's / b's per-example gradients are already
    materialised (cached), so that side costs nothing to build."""
    if a.dense is not None or b.dense is not None or not fa or not fb:
        return False
    if a.strategy != "auto":
        return a.strategy == "ghost"
    return prefer_ghost(fa, fb if b is not a else fa, diag, built)


def _compact_ids(a: ParamGrads, b: ParamGrads) -> tuple[Outer, Outer] | None:
    """Embedding-only gradients touch only the rows of the ids in the batch: renumber the ids
    of both sides over their union (u <= min(V, N T) rows), which keeps products exact and
    makes materialising cost N u D instead of N V D."""
    if a.dense is not None or b.dense is not None or len(a.factors) != 1 or len(b.factors) != 1:
        return None
    fa, fb = a.factors[0], b.factors[0]
    if not (fa.index and fb.index):
        return None
    if a is b:  # asked several times per batch (the cost model, .grad, Gram, norms): kept
        if a.compact_ids is None or a.compact_ids[0] is not fa:
            a.compact_ids = (fa, _compact_pair(fa, fa))
        return a.compact_ids[1]
    return _compact_pair(fa, fb)


def _compact_pair(fa: Outer, fb: Outer) -> tuple[Outer, Outer] | None:
    if fa is fb:  # a batch against itself: its own ids renumbered, one Outer for both sides
        ids, inv = torch.unique(fa.left.reshape(-1), return_inverse=True)
        if len(ids) >= fa.p:
            return None
        same = Outer(inv.view_as(fa.left), fa.right, len(ids))
        return same, same
    ids, inv = torch.unique(torch.cat([fa.left.reshape(-1), fb.left.reshape(-1)]),
                            return_inverse=True)
    if len(ids) >= fa.p:
        return None
    k = fa.left.numel()
    return (Outer(inv[:k].view_as(fa.left), fa.right, len(ids)),
            Outer(inv[k:].view_as(fb.left), fb.right, len(ids)))


FlatCache = dict[str, Tensor]
"""A ``BatchGrads``' materialised per-example gradients, parameter name -> (N, P); see
``inner``'s ``cache_a`` / ``cache_b``."""

FLAT_CACHE_BYTES = 1 << 28
"""Most bytes of materialised per-example gradients one ``BatchGrads`` keeps for reuse."""


def _flat(pg: ParamGrads, cache: FlatCache | None) -> Tensor:
    """pg's per-example gradients as (N, P), from ``cache`` or built (and kept while the
    cache holds at most ``FLAT_CACHE_BYTES``)."""
    if cache is not None and pg.name in cache:
        return cache[pg.name]
    m = pg.materialize().reshape(pg.n, -1).detach()
    if cache is not None:
        used = sum(t.numel() * t.element_size() for t in cache.values())
        if used + m.numel() * m.element_size() <= FLAT_CACHE_BYTES:
            cache[pg.name] = m
    return m


def inner(a: ParamGrads, b: ParamGrads, diag: bool = False, cache_a: FlatCache | None = None,
          cache_b: FlatCache | None = None) -> Tensor:
    """<g_i, h_j> over this parameter: (Na, Nb), or (N,) for ``diag`` (i == j, same batch).

    ``cache_a`` / ``cache_b``: where a's / b's materialised per-example gradients are kept
    (name -> (N, P)) between calls, e.g. a test batch crossed with many training batches:
    a side found there is not rebuilt, and the cost model counts it as free."""
    if not (a.factors or a.dense is not None) or not (b.factors or b.dense is not None):
        return a.param.new_zeros((a.n,) if diag else (a.n, b.n)).detach()
    compact = _compact_ids(a, b)
    fa, fb = ([compact[0]], [compact[1]]) if compact else (a.factors, b.factors)
    built = (not compact and cache_a is not None and a.name in cache_a,
             not compact and cache_b is not None and b.name in cache_b)
    if _use_ghost(a, b, fa, fb, diag, built):
        fn = ghost_diag if diag else ghost_cross
        return sum(fn(x, y) for x in fa for y in fb)
    if compact:
        ma = compact[0].materialize().reshape(a.n, -1)
        mb = ma if a is b else compact[1].materialize().reshape(b.n, -1)
    elif a is b and not built[0] and a.factors:  # used at once: build in the workspace
        ma = mb = rows_in_workspace(a)
        if ma is None:
            ma = mb = _flat(a, None)
    else:
        ma = _flat(a, cache_a)
        mb = ma if a is b else _flat(b, cache_b)
    if a is b:  # Gram / norms of one batch: build the per-example gradients once
        # the norm reads the rows once; ma * ma would write a fresh (N, P) temporary
        return torch.linalg.vector_norm(ma, dim=1).square() if diag else ma @ ma.T
    return (ma * mb).sum(1) if diag else dense_cross(ma, mb)


WORKSPACE_BYTES = 1 << 29
"""Largest (N, P) block of one parameter's per-example gradients built in the reused
workspace (one per thread, dtype and device, kept between steps)."""
_WORKSPACE = threading.local()


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """A flat buffer of ``numel`` elements, reused across calls (grown when needed), or None
    when it would exceed ``WORKSPACE_BYTES``."""
    if numel * torch.empty((), dtype=dtype).element_size() > WORKSPACE_BYTES:
        return None
    bufs = getattr(_WORKSPACE, "bufs", None)
    if bufs is None:
        bufs = _WORKSPACE.bufs = {}
    buf = bufs.get((dtype, device))
    if buf is None or buf.numel() < numel:
        buf = bufs[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def rows_in_workspace(pg: ParamGrads) -> Tensor | None:
    """pg's per-example gradients as (N, P) in the workspace (valid until the next use of the
    workspace), or None if they do not fit it."""
    gb, p, q = pg.factors[0].layout
    buf = workspace(pg.n * pg.param.numel(), pg.dtype, pg.param.device)
    if buf is None:
        return None
    out = buf.view(pg.n, gb, p, q)
    first = True
    if pg.dense is not None:
        out.copy_(pg.dense.reshape(out.shape))
        first = False
    for f in pg.factors:
        f.materialize_into(out, accumulate=not first)
        first = False
    return buf.view(pg.n, -1)


def bookkeeps(pg: ParamGrads, diag: bool = False) -> bool:
    """Should ``pg``'s per-example gradients be built once, for its Gram (``diag``: its
    norms) *and* its sum (``.grad``)? When the cost model would materialise them for that
    query anyway: then the sum of their rows replaces the weight-gradient product of the
    factors (one pass over N T p q multiply-adds instead of two: the book-keeping of Bu et
    al., 2023). Embeddings whose ids can be compacted go their own way."""
    if not pg.factors or pg.strategy == "ghost" or _compact_ids(pg, pg) is not None:
        return False
    if pg.n * pg.param.numel() * torch.empty((), dtype=pg.dtype).element_size() > \
            WORKSPACE_BYTES:
        return False
    return pg.strategy == "materialize" or not _use_ghost(pg, pg, pg.factors, pg.factors,
                                                          diag=diag)


def self_grams(params: dict[str, ParamGrads], cache: FlatCache | None = None
               ) -> dict[str, Tensor]:
    """Per-parameter Grams of one batch, name -> (N, N), as ``inner(pg, pg)``, except that
    a (N, d) operand shared by several parameters is multiplied once: a Linear's bias gradient
    (N, out) is its weight's left factor, so the (N, N) product G G^T (N^2 out flops, e.g.
    20 MFLOP for a 2048-wide layer at N = 100) serves both."""
    memo: dict[tuple, Tensor] = {}

    def gram2d(t: Tensor) -> Tensor:  # (N, d) -> (N, N)
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key not in memo:
            memo[key] = t @ t.T
        return memo[key]

    out = {}
    for name, pg in params.items():
        f = pg.factors[0] if len(pg.factors) == 1 else None
        if (pg.dense is None and f is not None and not f.index and f.layout[0] == f.t == 1
                and pg.strategy in ("auto", "ghost")):  # an MLP layer: ghost always wins
            out[name] = gram2d(f.left[:, 0, 0]) * gram2d(f.right[:, 0, 0])
        elif pg.dense is not None and not pg.factors and pg.dense.dim() == 2:
            out[name] = gram2d(pg.dense)
        else:
            out[name] = inner(pg, pg, cache_a=cache, cache_b=cache)
    return out
