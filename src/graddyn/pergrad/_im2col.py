"""im2col for convolutions from strided views, for the engine's convolution rules.

``patches(m, x)`` is ``F.unfold``'s ``(N, Cin k, L)`` layout (channel-major, then kernel
offsets; L output positions) built from ``Tensor.unfold`` views and one copy: faster than
``F.unfold`` (``tests/pergrad/test_im2col.py`` checks they agree), and it handles
Conv1d/2d/3d alike. ``pad_input``
pads the way the module's forward does (zeros / 'same' / 'valid' / non-zero padding modes).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


def patches(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, a: Tensor) -> Tensor:
    """im2col ``(N, Cin k, L)`` of the module's (padded) input, in ``F.unfold``'s order, from
    strided views (``Tensor.unfold``) and one copy: faster than ``F.unfold`` and not limited
    to 2-D."""
    x = pad_input(m, a)
    nd = len(m.kernel_size)
    for i, (k, s, d) in enumerate(zip(m.kernel_size, m.stride, m.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # appends a window dim of size k
    # (N, C, *out_positions, *kernel) -> (N, C, *kernel, *out_positions)
    x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
    return x.reshape(a.shape[0], -1, math.prod(x.shape[2 + nd:]))


def pad_input(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor) -> Tensor:
    """``x`` padded the way the module's forward pads it."""
    if m.padding_mode != "zeros":
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
    if m.padding == "valid":
        return x
    pads: list[int] = []  # F.pad order: last dim first, (left, right) each
    if m.padding == "same":  # total d (k - 1); the odd extra pixel goes to the end (as ATen)
        for d, k in zip(reversed(m.dilation), reversed(m.kernel_size)):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
    else:
        for p in reversed(m.padding):  # type: ignore[arg-type]
            pads += [p, p]
    return F.pad(x, pads) if any(pads) else x
