"""Torch-facing entry points of the compiled winsorized-mean kernel (``winsorize_jit``, numba).

``outer_corrections(G, X, c)`` gives the extremes correction of per-example gradients that
are outer products (a Linear layer on 2-D input) without materialising them;
``column_corrections(x, c)`` the same for a materialised (N, w) block. Both equal
``graddyn._robust.extremes_correction`` up to rounding (the correction is summed as
``sum_l (t_c - t_l) + (b_c - b_l)``), and are bitwise independent of chunking and threads.

``usable(*tensors)`` says whether the kernel applies: numba importable, not switched off
(``graddyn._kernels.ENABLED``), CPU tensors of float32 / float64. Callers check it first and
fall back to the reference (``graddyn._robust``) otherwise.

Compiling takes a few seconds per dtype on first use; ``cache=True`` stores the machine
code next to the module (or in numba's user cache dir), so later processes load it in
well under a second. Work is split over ``torch.get_num_threads()`` threads (the kernel
releases the GIL); rows (or columns) are independent, so the split does not change results.

>>> from graddyn._robust import extremes_correction
>>> x = torch.tensor([[0.0], [1.0], [2.0], [100.0]], dtype=torch.float64)
>>> column_corrections(x, 1) if usable(x) else extremes_correction(x, 1)  # 2 - 100 + 1 - 0
tensor([-97.], dtype=torch.float64)
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

import graddyn._kernels as switch

DTYPES = (torch.float32, torch.float64)
TILE_BYTES = 1 << 17
"""Working set of one column tile (see ``_tile``): measured best of 2^13 .. 2^20 bytes on
the 3x256 MLP (wider tiles amortise each loop's set-up; 2^18 and up fall out of L2 in
float64 at c = 8)."""
MIN_PARALLEL_VALUES = 1 << 21
"""Below this many values (N x rows x cols) one thread does the whole call."""

_jit: ModuleType | None = None
_import_failed = False
_ready: dict[torch.dtype, bool] = {}
_pool: ThreadPoolExecutor | None = None
"""Wall time of the first call per dtype (compiling, or loading numba's on-disk cache)."""


def usable(*tensors: Tensor) -> bool:
    """Whether the compiled kernel can take these tensors (see the module docstring).

    The first call per dtype compiles the kernel (or loads it from numba's cache); if numba
    is missing or cannot compile it, this says False (with one warning) and stays False."""
    if not switch.ENABLED or not all(t.device.type == "cpu" and t.dtype in DTYPES for t in tensors):
        return False
    return all(_compiled(dtype) for dtype in {t.dtype for t in tensors})


def _kernels() -> ModuleType | None:
    global _jit, _import_failed
    if _jit is None and not _import_failed:
        try:
            from graddyn._kernels import winsorize_jit
        except Exception:  # numba missing, or broken against this numpy / llvmlite
            _import_failed = True
        else:
            _jit = winsorize_jit
    return _jit


def _compiled(dtype: torch.dtype) -> bool:
    if dtype not in _ready:
        jit, ok = _kernels(), False
        if jit is not None:
            try:  # a tiny real call: compiles (or loads) this dtype's machine code
                g, x = torch.ones(3, 1, dtype=dtype), torch.arange(3, dtype=dtype)[:, None]
                jit.corrections(g.numpy(), x.numpy(), 1, 0, 1, 0, 1, g[0:1].numpy(), 16, True)
                ok = True
            except Exception as err:  # a numba that cannot compile it: the reference
                warnings.warn(f"graddyn: compiled winsorized-mean kernel unavailable for "
                              f"{dtype} ({err!r}); using the PyTorch reference", stacklevel=3)
        _ready[dtype] = ok
    return _ready[dtype]


def outer_corrections(left: Tensor, right: Tensor, c: int) -> Tensor:
    """Extremes correction of g_n = outer(left[n], right[n]): left (N, rows), right (N, cols)
    -> (rows, cols), i.e. ``extremes_correction`` of the (N, rows cols) per-example values
    ``left[n, i] * right[n, j]`` (each product rounded once, as ``torch.mul`` does).

    The kernel skips the examples whose entry on its row side is 0: it streams
    nonzero(row side) x (other side's width) values, so the side that makes this smaller
    goes there (e.g. MNIST pixels, ~80% zeros, rather than the output gradients of ReLU
    units, ~50%). Products commute, so the transposed problem gives the same values."""
    g = left.detach().contiguous()
    x = right.detach().to(g.dtype).contiguous()
    # numpy counts: a torch reduction here would wake torch's thread pool for a tiny job
    nz_g, nz_x = np.count_nonzero(g.numpy()), np.count_nonzero(x.numpy())
    if nz_x * g.shape[1] < nz_g * x.shape[1]:
        return _outer(x, g, c).T
    return _outer(g, x, c)


def _outer(g: Tensor, x: Tensor, c: int) -> Tensor:
    out = torch.empty(g.shape[1], x.shape[1], dtype=g.dtype)
    # X >= 0 (ReLU outputs, pixels): each example feeds only one of the two lists
    _run(g, x, c, out, x_nonneg=bool(np.all(x.numpy() >= 0)))
    return out


def column_corrections(x: Tensor, c: int) -> Tensor:
    """``extremes_correction(x, c)`` of a block x (N, w) -> (w,)."""
    x = x.detach().contiguous()
    out = torch.empty(1, x.shape[1], dtype=x.dtype)
    _run(torch.ones(x.shape[0], 1, dtype=x.dtype), x, c, out, x_nonneg=False)
    return out[0]


def _tile(c: int, dtype: torch.dtype) -> int:
    """Columns per tile: the working set (4 list buffers of c + 5 rows and the sorted group's
    4 rows) within ``TILE_BYTES``, a multiple of 16 (whole vectors)."""
    width = TILE_BYTES // ((4 * (c + 5) + 4) * (torch.finfo(dtype).bits // 8))
    return max(16, width - width % 16)


def _run(g: Tensor, x: Tensor, c: int, out: Tensor, x_nonneg: bool) -> None:
    """out (rows, cols) = corrections of G = g (N, rows) and X = x (N, cols), threaded."""
    jit = _kernels()
    rows, cols = out.shape
    tile = _tile(c, x.dtype)
    args = (g.numpy(), x.numpy(), c)
    o = out.numpy()
    parts = _parts(rows, cols, x.shape[0], tile)
    if len(parts) == 1:
        jit.corrections(*args, *parts[0], o, tile, x_nonneg)
        return
    jobs = [_executor().submit(jit.corrections, *args, *p, o, tile, x_nonneg) for p in parts]
    for job in jobs:
        job.result()


def _parts(rows: int, cols: int, n: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(r0, r1, a_lo, a_hi) pieces for ``torch.get_num_threads()`` threads: split rows, or
    columns in whole tiles when there are fewer rows than threads."""
    threads = torch.get_num_threads()
    if threads <= 1 or n * rows * cols < MIN_PARALLEL_VALUES:
        return [(0, rows, 0, cols)]
    if rows >= threads:
        cuts = [rows * t // threads for t in range(threads + 1)]
        return [(a, b, 0, cols) for a, b in zip(cuts, cuts[1:]) if b > a]
    tiles = -(-cols // tile)
    cuts = [min(cols, tile * (tiles * t // threads)) for t in range(threads + 1)]
    return [(0, rows, a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                                   thread_name_prefix="graddyn-winsorize")
    return _pool


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: jobs would wait forever."""
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)
