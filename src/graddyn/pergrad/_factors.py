"""Factored per-example gradients and their exact products ("ghost" forms).

Many layers give each example's gradient of a weight matrix as a sum of outer products,

    g_n = sum_t  L[n, t] (x) R[n, t]            L: (N, T, p)   R: (N, T, q)   g_n: (p, q)

(Linear: L = output grads, R = inputs, t = sequence positions; Conv: t = output pixels and
R = im2col patches; Embedding: L = one-hot of the token ids). Inner products between two such
gradients never need the (p, q) matrices (Goodfellow 2015; Li et al. 2022 "ghost clipping"):

    <g_i, h_j> = sum_{t,s} (L_i,t . L'_j,s) (R_i,t . R'_j,s)       cost (N T)(M S)(p + q)

A leading block axis ``Gb`` (conv groups) gives a block-diagonal weight; blocks add up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor


class Outer:
    """g_n = stack_g sum_t left[n, g, t] (x) right[n, g, t], reshaped to the parameter's shape.

    ``left`` is dense ``(N, Gb, T, p)`` or integer token ids ``(N, T)`` standing for one-hot
    rows of length ``p`` (then ``Gb == 1``); ``right`` is ``(N, Gb, T, q)``, or a function that
    builds it with ``right_shape`` given (a convolution's im2col patches: built only where a
    product of the factors needs them).

    A layer may also pass its own kernels, each faster than a product of the factors:
    ``total_fn() -> (Gb p, q)``-viewable sum over examples (a convolution's weight gradient)
    and ``rows_fn() -> (N, Gb, p, q)``-viewable per-example gradients (the same kernel with
    the examples as convolution groups, as torch.func's batching rule does).
    """

    __slots__ = ("left", "_right", "_right_fn", "right_shape", "p", "total_fn", "rows_fn")

    def __init__(self, left: Tensor, right: Tensor | Callable[[], Tensor], p: int,
                 total_fn: Callable[[], Tensor] | None = None,
                 rows_fn: Callable[[], Tensor] | None = None,
                 right_shape: tuple[int, ...] | None = None) -> None:
        self.left, self.p, self.total_fn, self.rows_fn = left, p, total_fn, rows_fn
        if isinstance(right, Tensor):
            self._right, self._right_fn, self.right_shape = right, None, tuple(right.shape)
        else:
            if right_shape is None:
                raise ValueError("Outer: a lazy right factor needs right_shape")
            self._right, self._right_fn, self.right_shape = None, right, tuple(right_shape)

    @property
    def right(self) -> Tensor:
        if self._right is None:
            self._right = self._right_fn()
            self._right_fn = None
        return self._right

    @property
    def index(self) -> bool:
        return not self.left.is_floating_point()

    @property
    def layout(self) -> tuple[int, int, int]:
        """(Gb, p, q): two factors with the same layout describe the same matrix view."""
        return (self.right_shape[1], self.p, self.right_shape[3])

    @property
    def n(self) -> int:
        return self.right_shape[0]

    @property
    def t(self) -> int:
        return self.right_shape[2]

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the per-example gradients (the right factor's; a dense left has it too)."""
        return self._right.dtype if self._right is not None else self.left.dtype

    def rows(self, sl: slice) -> Outer:
        """The same factor restricted to examples ``sl``."""
        return Outer(self.left[sl], self.right[sl], self.p)

    def cat(self, other: Outer) -> Outer:
        """Sum of two uses = concatenation along t (exact; used for tied/reused weights)."""
        fa, fb = self.total_fn, other.total_fn
        total_fn = (lambda: fa() + fb()) if fa is not None and fb is not None else None
        ra, rb = self.rows_fn, other.rows_fn
        rows_fn = (lambda: ra() + rb()) if ra is not None and rb is not None else None
        return Outer(torch.cat([self.left, other.left], dim=-1 if self.index else 2),
                     torch.cat([self.right, other.right], dim=2), self.p, total_fn, rows_fn)

    def _right_tq(self) -> Tensor:
        """Right factor as (N Gb, T, q), a strided view (no copy) when it is the transpose of
        a contiguous (N, Gb, q, T) tensor (im2col patches)."""
        n, gb, t, q = self.right.shape
        rt = self.right.transpose(-1, -2)
        if rt.is_contiguous():
            return rt.reshape(n * gb, q, t).transpose(1, 2)
        return self.right.reshape(n * gb, t, q)

    def _left_pt(self) -> Tensor:
        """Left factor as (N Gb, p, T) without a copy when it is a transposed view of a
        contiguous (N, Gb, p, T) tensor (convolutions: output gradients are channel-major)."""
        n, gb, t, p = self.left.shape
        lt = self.left.transpose(-1, -2)
        if lt.is_contiguous():
            return lt.reshape(n * gb, p, t)
        return self.left.reshape(n * gb, t, p).transpose(1, 2)

    def materialize(self) -> Tensor:
        """-> (N, Gb, p, q); cost N Gb T p q flops (dense) or N T q (ids) + N p q memory."""
        n, gb, t, q = self.right_shape
        if self.rows_fn is not None:
            return self.rows_fn().view(n, gb, self.p, q)
        if self.index:
            out = self.right.new_zeros(n * self.p, q)
            flat = self.left + torch.arange(n, device=self.left.device)[:, None] * self.p
            out.index_add_(0, flat.reshape(-1), self.right.reshape(n * t, q))
            return out.view(n, 1, self.p, q)
        return torch.bmm(self._left_pt(), self._right_tq()).view(n, gb, self.p, q)

    def materialize_into(self, out: Tensor, accumulate: bool) -> None:
        """``out`` (N, Gb, p, q) = (or, with ``accumulate``, +=) the per-example gradients,
        written in place: a reused buffer spares the fresh pages a new (N, Gb, p, q) tensor
        costs (the OS zeroes them), as much as the product itself for large layers."""
        n, gb, t, q = self.right_shape
        if self.rows_fn is not None:
            rows = self.rows_fn().view(out.shape)
            out.add_(rows) if accumulate else out.copy_(rows)
            return
        if self.index:
            flat = out.view(n * self.p, q)
            if not accumulate:
                flat.zero_()
            ids = self.left + torch.arange(n, device=self.left.device)[:, None] * self.p
            flat.index_add_(0, ids.reshape(-1), self.right.reshape(n * t, q))
            return
        o = out.view(n * gb, self.p, q)
        if t == 1:  # outer products: a broadcast multiply, not a bmm of inner size 1
            prod = self.left.reshape(n * gb, self.p, 1) * self.right.reshape(n * gb, 1, q)
            o.add_(prod) if accumulate else o.copy_(prod)
            return
        lt, rt = self._left_pt(), self._right_tq()  # (N Gb, p, T), (N Gb, T, q)
        if accumulate:
            torch.baddbmm(o, lt, rt, out=o)
        else:
            torch.bmm(lt, rt, out=o)

    def materialize_rows(self, r0: int, r1: int) -> Tensor:
        """Rows r0:r1 of the (Gb p, q) matrix view, for every example -> (N, r1 - r0, q)."""
        n, gb, t, q = self.right.shape
        if self.index:
            keep = (self.left >= r0) & (self.left < r1)
            sub = Outer(torch.where(keep, self.left - r0, 0),
                        self.right * keep[:, None, :, None], r1 - r0)
            return sub.materialize().view(n, r1 - r0, q)
        parts = []
        for g in range(r0 // self.p, (r1 - 1) // self.p + 1):
            a, b = max(r0 - g * self.p, 0), min(r1 - g * self.p, self.p)
            lt = self.left[:, g, :, a:b].transpose(1, 2)  # (N, b - a, T)
            parts.append(torch.bmm(lt, self.right[:, g]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def total(self, scale: float = 1.0) -> Tensor:
        """scale * sum_n g_n -> (Gb, p, q): what autograd gives for the (scaled) summed loss.
        ``scale`` goes on the smaller of the two factors (no extra pass over p x q)."""
        n, gb, t, q = self.right_shape
        if self.total_fn is not None:
            total = self.total_fn().reshape(gb, self.p, q)
            return total * scale if scale != 1.0 else total
        left, right = self.left, self.right
        if scale != 1.0:
            if self.index or q <= self.p:
                right = right * scale
            else:
                left = left * scale
        if self.index:
            out = right.new_zeros(self.p, q)
            return out.index_add_(0, left.reshape(-1), right.reshape(-1, q))[None]
        if gb == 1:  # Linear (the per-step case): one mm, fewest view ops
            return torch.mm(left.reshape(n * t, self.p).T, right.reshape(n * t, q))[None]
        lt = left.transpose(0, 1).reshape(gb, n * t, self.p).transpose(1, 2)
        return torch.bmm(lt, right.transpose(0, 1).reshape(gb, n * t, q))

    def into(self, dst: Tensor, scale: float, accumulate: bool) -> bool:
        """For a dense factor with Gb = 1 (Linear): ``dst`` (p x q elements) += (or =)
        ``scale * sum_n g_n`` by one in-place ``addmm``; False (nothing done) otherwise."""
        if (self.total_fn is not None or self.index or self.right_shape[1] != 1
                or not dst.is_contiguous() or dst.dtype != self.right.dtype
                or dst.numel() != self.p * self.right_shape[3]):
            return False
        n, _, t, q = self.right.shape
        left, right = self.left, self.right
        if scale != 1.0:  # on the smaller factor, as ``total``: the same rounding either way
            if q <= self.p:
                right = right * scale
            else:
                left = left * scale
        d2 = dst.view(self.p, q)
        torch.addmm(d2, left.reshape(n * t, self.p).T, right.reshape(n * t, q),
                    beta=1.0 if accumulate else 0.0, out=d2)
        return True


def _kernel(a: Outer, b: Outer) -> Tensor:
    """(Gb, Na Ta, Nb Tb) products of the left factors (dense . dense, id == id, id -> gather)."""
    if a.index and b.index:
        return (a.left.reshape(-1, 1) == b.left.reshape(1, -1)).to(a.right.dtype)[None]
    if a.index:
        return _kernel(b, a).transpose(1, 2)
    if b.index:  # L_a[i, t, id_b[j, s]]
        return a.left.reshape(-1, a.p)[:, b.left.reshape(-1)][None]
    gb = a.left.shape[1]
    la = a.left.transpose(0, 1).reshape(gb, -1, a.p)
    lb = b.left.transpose(0, 1).reshape(gb, -1, b.p)
    return torch.bmm(la, lb.transpose(1, 2))


def ghost_cross(a: Outer, b: Outer, max_elems: int = 1 << 24) -> Tensor:
    """<g_i, h_j> for all i, j without forming g -> (Na, Nb).

    Formula: sum_g sum_{t,s} (L_a[i,g,t] . L_b[j,g,s]) (R_a[i,g,t] . R_b[j,g,s]).
    Cost: 2 Gb (Na Ta)(Nb Tb)(p + q) flops; memory ``max_elems`` by chunking examples of ``a``.
    """
    gb, ta, tb, nb = a.layout[0], a.t, b.t, b.n
    if gb == ta == tb == 1 and not (a.index or b.index):  # e.g. an MLP layer: two matmuls
        return (a.left[:, 0, 0] @ b.left[:, 0, 0].T) * (a.right[:, 0, 0] @ b.right[:, 0, 0].T)
    step = max(1, max_elems // max(1, gb * ta * nb * tb))
    rb = b.right.transpose(0, 1).reshape(gb, nb * tb, -1)
    out = []
    for s in range(0, a.n, step):
        ac = a.rows(slice(s, s + step))
        ra = ac.right.transpose(0, 1).reshape(gb, ac.n * ta, -1)
        k = _kernel(ac, b) * torch.bmm(ra, rb.transpose(1, 2))  # (Gb, n ta, Nb tb)
        out.append(k.view(gb, ac.n, ta, nb, tb).sum((0, 2, 4)))
    return torch.cat(out, 0)


def ghost_diag(a: Outer, b: Outer) -> Tensor:
    """<g_n, h_n> for each n (both with the same examples) -> (N,); cost 2 N Gb Ta Tb (p+q)."""
    n, gb = a.n, a.layout[0]
    if gb == a.t == b.t == 1 and not (a.index or b.index):  # (N,) products of row dots
        return ((a.left * b.left).sum((1, 2, 3)) * (a.right * b.right).sum((1, 2, 3)))
    ra, rb = _blocks(a.right), _blocks(b.right)  # (N Gb, Ta, q), (N Gb, Tb, q)
    rr = torch.bmm(ra, rb.transpose(1, 2))  # (N Gb, Ta, Tb)
    if a.index and b.index:
        ll = (a.left[:, :, None] == b.left[:, None, :]).to(rr.dtype)
    elif a.index:
        return ghost_diag(b, a)
    elif b.index:  # L_a[n, t, id_b[n, s]]
        idx = b.left[:, None, :].expand(n, a.t, b.t)
        ll = a.left[:, 0].gather(2, idx)
    else:
        ll = torch.bmm(_blocks(a.left), _blocks(b.left).transpose(1, 2))
    return (ll.reshape(rr.shape) * rr).view(n, -1).sum(1)


def _blocks(f: Tensor) -> Tensor:
    """(N, Gb, T, d) -> (N Gb, T, d); with Gb = 1 a view in any strides (bmm reads strided
    batches; a reshape would copy a transposed activation or gradient)."""
    return f[:, 0] if f.shape[1] == 1 else f.reshape(-1, *f.shape[2:])


def dense_cross(a: Tensor, b: Tensor) -> Tensor:
    """(Na, *shape) x (Nb, *shape) -> (Na, Nb) inner products; cost 2 Na Nb P."""
    return a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T


def chunks(n: int, size: int | None) -> Iterator[slice]:
    """Slices covering range(n) in steps of ``size`` (one slice if None)."""
    size = n if size is None else max(1, int(size))
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))
