"""Per-example gradient rules for convolutions (1-, 2-, 3-d) and transposed convolutions.

Convolution: with patches U = im2col(x): (N, Cin k, L) and output grads G: (N, Cout, L) over the
L output positions, per group c (block-diagonal weight)
    dW_n[c] = sum_l G[n, c, :, l] (x) U[n, c, :, l]
    -> Outer(L = G^T (N, groups, L, Cout/g), R = U^T (N, groups, L, Cin/g k)).
Transposed convolution (weight (Cin, Cout/g, *k)): y[o, i s + k d - p] += x[c, i] W[c, o, k],
so dW_n[c, (o, k)] = sum_i x[n, c, i] V[n, (o, k), i] with V = im2col of the *output gradient*
(padding p, same kernel/stride/dilation; output_padding only lengthens G)
    -> Outer(L = x^T (N, groups, L_in, Cin/g), R = V^T (N, groups, L_in, Cout/g k)).
Biases: sum of G over positions, (N, Cout).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor, nn

from ._factors import Outer
from ._im2col import pad_input, patches
from ._rules import RuleCall, Use, register_rule


def _batched_input(m: nn.modules.conv._ConvNd, args: tuple, kwargs: dict) -> bool:
    """An unbatched call (C, *spatial) has no example dimension: the exact path serves it."""
    return bool(args) and args[0].dim() == len(m.kernel_size) + 2


def _groups_last(t: Tensor, n: int, groups: int) -> Tensor:
    """(N, C, L) -> (N, groups, L, C / groups)."""
    return t.reshape(n, groups, -1, t.shape[-1]).transpose(2, 3)


def _weight_grad(m: nn.Module, x: Tensor, g: Tensor, transposed: bool) -> Tensor:
    """The summed weight gradient by the convolution's own backward kernel (what autograd
    runs): the engine's ``.grad`` of a convolution, instead of a product of its factors."""
    x = pad_input(m, x) if not transposed and m.padding_mode != "zeros" else x
    padding = (0,) * len(m.kernel_size) if not transposed and m.padding_mode != "zeros" \
        else m.padding
    if isinstance(padding, str):  # 'same' / 'valid': pad_input gives the padded input
        x, padding = pad_input(m, x), (0,) * len(m.kernel_size)
    weight = m.weight.detach()
    return torch.ops.aten.convolution_backward(
        g.to(weight.dtype), x.to(weight.dtype), weight, None, list(m.stride), list(padding),
        list(m.dilation), transposed, list(getattr(m, "output_padding", (0,) *
                                                    len(m.kernel_size))),
        m.groups, [False, True, False])[1]


def conv_rule(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, call: RuleCall) -> list[Use]:
    """Per-example weight factors and dense bias (N, Cout); see the module docstring."""
    g = call.grad
    n, cout, groups = g.shape[0], m.out_channels, m.groups
    x = call.args[0]
    g3 = g.reshape(n, cout, -1)  # (N, Cout, L)
    uses: list[Use] = []
    if "weight" in call.wanted:
        u = patches(m, x)  # (N, Cin k, L), F.unfold's layout from strided views
        total = (lambda: _weight_grad(m, x, g, False)) if isinstance(m, nn.Module) else None
        uses.append(("weight", Outer(_groups_last(g3, n, groups), _groups_last(u, n, groups),
                                     cout // groups, total)))
    if "bias" in call.wanted and m.bias is not None:
        uses.append(("bias", g3.sum(2)))
    return uses


def conv_transpose_rule(m: nn.modules.conv._ConvTransposeNd, call: RuleCall) -> list[Use]:
    """Per-example weight factors of a transposed convolution; see the module docstring."""
    g, x = call.grad, call.args[0]
    n, cin, groups = g.shape[0], m.in_channels, m.groups
    uses: list[Use] = []
    if "weight" in call.wanted:
        geometry = SimpleNamespace(kernel_size=m.kernel_size, stride=m.stride,
                                   dilation=m.dilation, padding=m.padding, padding_mode="zeros")
        v = patches(geometry, g)  # (N, Cout k, L_in)
        xl = x.reshape(n, cin, -1)  # (N, Cin, L_in)
        uses.append(("weight", Outer(_groups_last(xl, n, groups), _groups_last(v, n, groups),
                                     cin // groups)))
    if "bias" in call.wanted and m.bias is not None:
        uses.append(("bias", g.reshape(n, m.out_channels, -1).sum(2)))
    return uses


for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_t, conv_rule, applies=_batched_input)
for _t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_t, conv_transpose_rule, applies=_batched_input)
