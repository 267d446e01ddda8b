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


def _weight_grad(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, x: Tensor, g: Tensor,
                 per_example: bool) -> Tensor:
    """The weight gradient by the convolution's own backward kernel (what autograd runs):
    summed over examples -> (Cout, Cin/groups, *k); or, with ``per_example``, each example's
    -> (N Cout, Cin/groups, *k), the examples folded into the groups (N groups convolutions
    of one example each: torch.func's batching rule for convolutions). x: (N, Cin, *S),
    g: (N, Cout, *S_out)."""
    padding = m.padding
    if m.padding_mode != "zeros" or isinstance(padding, str):  # 'same'/'valid'/reflect...
        x, padding = pad_input(m, x), (0,) * len(m.kernel_size)
    w = m.weight.detach()
    x, g, groups = x.to(w.dtype), g.to(w.dtype), m.groups
    if per_example:
        n = x.shape[0]
        x, g, groups = x.reshape(1, -1, *x.shape[2:]), g.reshape(1, -1, *g.shape[2:]), n * groups
        w = w.new_empty(()).expand(n * w.shape[0], *w.shape[1:])  # read for its shape only
    return torch.ops.aten.convolution_backward(
        g, x, w, None, list(m.stride), list(padding), list(m.dilation), False,
        [0] * len(m.kernel_size), groups, [False, True, False])[1]


def conv_rule(m: nn.Conv1d | nn.Conv2d | nn.Conv3d, call: RuleCall) -> list[Use]:
    """Per-example weight factors and dense bias (N, Cout); see the module docstring."""
    g = call.grad
    n, cout, groups = g.shape[0], m.out_channels, m.groups
    x = call.args[0]
    g3 = g.reshape(n, cout, -1)  # (N, Cout, L)
    uses: list[Use] = []
    if "weight" in call.wanted:
        left = _groups_last(g3, n, groups)  # (N, groups, L, Cout/g)
        q = m.weight[0].numel()  # Cin/g k
        # the im2col patches (N, groups, L, Cin/g k) only where a product of the factors
        # needs them; the sum comes from the convolution's backward kernel, and so do the
        # per-example gradients where that kernel with N times the groups is the faster
        # way (groups of 8-64 input channels: docs/benchmarks.md, "convolutions")
        cin_g = m.weight.shape[1]
        uses.append(("weight", Outer(
            left, lambda: _groups_last(patches(m, x), n, groups), cout // groups,
            total_fn=lambda: _weight_grad(m, x, g, False),
            rows_fn=(lambda: _weight_grad(m, x, g, True)) if 8 <= cin_g <= 64 else None,
            right_shape=(n, groups, left.shape[2], q))))
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
