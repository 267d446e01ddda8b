"""Where the examples of a batch sit in a recorded tensor, and the layout check that establishes it.

The engine never assumes that dimension 0 is the batch. For every tensor whose gradient it
reads (module outputs, frontier tensors of the exact path), a :class:`Layout` says along which
dimension the B examples lie, found by an exact test of the gradients themselves:

with seeds ``1`` and ``v`` on the losses (``v_n`` distinct powers of two), the gradients
``G`` and ``G_v`` of a tensor whose slice n only reaches loss n satisfy ``G_v = v (.) G`` along
that dimension, bitwise in any precision (a power-of-two factor commutes with rounding);
a tensor shared by the examples (positions ``pos(arange(T))``), or one that couples them
(train-mode BatchNorm upstream, ``losses + losses.mean()``, ``losses.flip(0)``), mixes
rows and fails the test. A dimension of size ``B k`` also passes when the examples are
blocks of k rows (``(B T, D)`` token layouts) or interleaved with stride B (``(T B, D)``,
sequence-first flattening, as inside ``nn.MultiheadAttention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_RTOL = {torch.float64: 1e-12, torch.float32: 1e-5}
_LOW_PRECISION_RTOL = 2e-2  # bfloat16 / float16: 2 ulps of the largest entry


@dataclass(frozen=True)
class Layout:
    """Examples along ``dim``: one row each (``block == 1``), ``block`` consecutive rows each
    (example n at rows ``n block .. n block + block - 1``) or, with ``minor``, interleaved
    (example n at rows ``j B + n``)."""

    dim: int
    block: int = 1
    minor: bool = False

    def row_example(self, b: int, device: torch.device) -> Tensor:
        """(size of ``dim``,) -> the example each row belongs to."""
        n = torch.arange(b, device=device)
        if self.block == 1:
            return n
        return n.repeat(self.block) if self.minor else n.repeat_interleave(self.block)

    def front(self, t: Tensor, b: int) -> Tensor:
        """``t`` with the examples first: (B, *rest) for block 1, else (B, block, *rest)."""
        t = t.movedim(self.dim, 0) if self.dim else t
        if self.block == 1:
            return t
        if self.minor:  # rows j B + n -> (block, B, ...) -> (B, block, ...)
            return t.reshape(self.block, b, *t.shape[1:]).transpose(0, 1)
        return t.reshape(b, self.block, *t.shape[1:])

    def masks(self, shape: tuple[int, ...], b: int, device: torch.device,
              dtype: torch.dtype) -> Tensor:
        """(B, *shape) with ones on example n's slice of a tensor of ``shape`` in row n."""
        onehot = (self.row_example(b, device)[None, :] == torch.arange(b, device=device)[:, None])
        view = [b] + [1] * len(shape)
        view[1 + self.dim] = shape[self.dim]
        return onehot.to(dtype).reshape(view).expand(b, *shape)

    @property
    def is_first(self) -> bool:
        return self.dim == 0 and self.block == 1


FIRST = Layout(0)


def check_seeds(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(B,) distinct powers of two where possible (2^-12 .. 2^12; 2^-4 .. 2^4 for float16,
    whose range is narrow), in a fixed pseudo-random order."""
    reach = 4 if dtype == torch.float16 else 12
    gen = torch.Generator().manual_seed(0)
    values = torch.randperm(2 * reach + 1, generator=gen) - reach
    if b > values.numel():
        values = torch.randint(-reach, reach + 1, (b,), generator=gen)
    return torch.pow(2.0, values[:b].to(torch.float64)).to(dtype=dtype, device=device)


def find_layout(g1: Tensor | None, gv: Tensor | None, v: Tensor) -> Layout | None | str:
    """The layout in which ``gv == v (.) g1`` (see the module docstring), ``"unused"`` when the
    tensor does not reach the losses (no or zero gradient), or None (shared or coupled).

    ``g1``, ``gv``: gradients of one tensor for the seeds 1 and ``v`` (B,). Dimensions of size
    B are tried first (lowest first), then blocked and interleaved ones of size B k."""
    if g1 is None or gv is None:
        return "unused"
    b = v.numel()
    scale = float(g1.abs().max()) * float(v.abs().max()) if g1.numel() else 0.0
    if scale == 0.0:
        return "unused"
    tol = _RTOL.get(g1.dtype, _LOW_PRECISION_RTOL) * scale
    single = [Layout(d) for d, s in enumerate(g1.shape) if s == b]
    grouped = [Layout(d, s // b, minor) for d, s in enumerate(g1.shape)
               if s != b and s % b == 0 and s > 0 for minor in (False, True)]
    for lay in single + grouped:
        shape = [1] * g1.ndim
        shape[lay.dim] = g1.shape[lay.dim]
        vexp = v[lay.row_example(b, v.device)].reshape(shape).to(g1.dtype)
        if float((gv - g1 * vexp).abs().max()) <= tol:
            return lay
    return None
