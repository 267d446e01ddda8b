"""Per-example gradient rule for nn.Conv1d / nn.Conv2d via im2col (``graddyn._im2col``).

With patches U = unfold(x): (N, Cin k, L) and output grads G: (N, Cout, L) (L output pixels),
per group c (block-diagonal weight):  dW_n[c] = sum_l G[n, c, :, l] (x) U[n, c, :, l].
-> Outer(L = G^T (N, groups, L, Cout/groups), R = U^T (N, groups, L, Cin/groups k)).
Stride, padding (ints, 'same', 'valid', non-zero padding modes) and dilation are handled by
``patches`` (strided views and one copy, ~15x faster than ``F.unfold`` here).
"""

from __future__ import annotations

from torch import Tensor, nn

from .._im2col import patches
from ._factors import Outer
from ._rules_linear import Use


def conv_rule(m: nn.Conv1d | nn.Conv2d, args: tuple, g: Tensor, wanted: set[str]) -> list[Use]:
    """Per-example weight factors and dense bias (N, Cout); see module docstring."""
    n, cout, groups = g.shape[0], m.out_channels, m.groups
    g = g.reshape(n, cout, -1)  # (N, Cout, L)
    uses: list[Use] = []
    if "weight" in wanted:
        u = patches(m, args[0])  # (N, Cin k, L), F.unfold's layout from strided views
        u = u.view(n, groups, -1, u.shape[-1]).transpose(2, 3)  # (N, groups, L, Cin/g k)
        gg = g.view(n, groups, cout // groups, -1).transpose(2, 3)  # (N, groups, L, Cout/g)
        uses.append(("weight", Outer(gg, u, cout // groups)))
    if "bias" in wanted and m.bias is not None:
        uses.append(("bias", g.sum(2)))
    return uses
