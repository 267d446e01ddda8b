"""Is a network piecewise linear in each of the selected parameters? (a walk of its graph)

:func:`exact_trace` relies on ``d^2 f / d theta_i^2 = 0`` for every output ``f`` and every
selected scalar parameter ``theta_i`` (almost everywhere). That holds when, following the
autograd graph from the output back to the parameters, every node is

- locally affine in all its inputs together (adds, views, sums, ReLU, max-pooling, ...), or
- affine in each input separately (products, matmuls, convolutions, eval-mode batch norm)
  with no selected parameter reaching two of its inputs (``W x`` is fine, ``x * x`` or a
  layer applied twice is not), or
- a division whose denominator does not depend on the selected parameters.

Nodes no selected parameter reaches are not checked: with ``params`` restricted to the last
layer, any network qualifies. Everything else (tanh, GELU, softmax, LayerNorm, exp, ...) is
refused, naming the innermost module whose forward created the node. Cost: one walk over
the graph's nodes and two tiny autograd ops per module call to time-stamp it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# Node names without the "Backward<n>" suffix, e.g. "AddmmBackward0" -> "Addmm".
_LOCALLY_AFFINE = frozenset("""
    Add Sub Neg Cat Stack View UnsafeView Reshape ReshapeAlias Alias AsStrided T Transpose
    Permute Expand Squeeze Unsqueeze Clone ToCopy Slice Select Index IndexSelect Gather Sum
    Mean Split SplitWithSizes Unbind Repeat Flip Roll ConstantPadNd Im2Col Col2Im Embedding
    AvgPool2D AvgPool3D AdaptiveAvgPool2D AdaptiveAvgPool3D UpsampleNearest1D
    UpsampleNearest2D UpsampleNearest3D
    Relu LeakyRelu Hardtanh Threshold Abs Clamp ClampMin ClampMax Maximum Minimum Max Min
    Amax Amin Where MaskedFill MaxPool2DWithIndices MaxPool3DWithIndices AdaptiveMaxPool2D
    AdaptiveMaxPool3D
""".split())
_MULTILINEAR = frozenset("""
    Mul Mm Addmm Bmm Baddbmm Addbmm Mv Addmv Dot Vdot Convolution PreluKernel
    NativeBatchNorm CudnnBatchNorm MiopenBatchNorm
""".split())
_BATCH_NORMS = frozenset({"NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm"})


class NotPiecewiseLinearError(ValueError):
    """The network is not piecewise linear in the selected parameters (see the message)."""


_HINT = ("The exact trace needs a network that is piecewise linear in each selected "
         "parameter (Linear/Conv, ReLU/LeakyReLU, max/average pooling, eval-mode BatchNorm, "
         "Dropout in eval mode, residual sums). Use hutchinson_trace(op) or hutchpp_trace(op) "
         "instead, or select only parameters after that module (e.g. the last layer).")


class ModuleSpans:
    """Which module created which autograd node: each module call is time-stamped with the
    autograd sequence numbers (a per-thread counter that every new node takes the next value
    of) at its start and end; a node belongs to the innermost call whose span contains it."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int, str]] = []  # (start, end, "name (Type)")
        self.by_module: dict[int, list[tuple[int, int]]] = {}  # id(module) -> its calls
        self._marker = torch.ones((), requires_grad=True)

    def now(self) -> int:
        with torch.enable_grad():
            return (self._marker * 1.0).grad_fn._sequence_nr()  # type: ignore[union-attr]

    @contextmanager
    def record(self, model: nn.Module) -> Iterator[ModuleSpans]:
        open_calls: list[int] = []
        handles = []
        for name, m in model.named_modules():
            label = f"'{name or type(model).__name__}' ({type(m).__name__})"

            def pre(_m, _args) -> None:
                open_calls.append(self.now())

            def post(m, _args, _out, label=label) -> None:
                start, end = open_calls.pop(), self.now()
                self.spans.append((start, end, label))
                self.by_module.setdefault(id(m), []).append((start, end))

            handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()

    def owner(self, node: object) -> str:
        seq = node._sequence_nr()  # type: ignore[attr-defined]
        inside = [(end - start, label) for start, end, label in self.spans if start < seq < end]
        return min(inside)[1] if inside else "(outside any module)"


def _op(node: object) -> str:
    return re.sub(r"Backward\d*$", "", type(node).__name__)


def check_piecewise_linear(out: Tensor, params: dict[str, Tensor], spans: ModuleSpans) -> None:
    """Raise :class:`NotPiecewiseLinearError` unless ``out`` is piecewise linear in each of
    ``params`` (name -> leaf tensor that the forward used), as described in the module doc."""
    bit = {id(t): 1 << i for i, t in enumerate(params.values())}
    names = list(params)
    deps: dict[object, int] = {}  # node -> bitmask of the selected parameters that reach it
    for node in _post_order(out.grad_fn):
        children = [c for c, _ in node.next_functions if c is not None]
        if _op(node) == "AccumulateGrad":
            deps[node] = bit.get(id(node.variable), 0)
            continue
        ins = [deps[c] for c in children]
        deps[node] = dep = _or(ins)
        if dep:
            _check_node(node, ins, names, spans)


def _check_node(node: object, ins: list[int], names: list[str], spans: ModuleSpans) -> None:
    op = _op(node)
    if op in _LOCALLY_AFFINE:
        return
    where = spans.owner(node)
    if op in _BATCH_NORMS and getattr(node, "_saved_training", False):
        raise NotPiecewiseLinearError(
            f"module {where} runs batch norm in training mode (batch statistics make it "
            "nonlinear in the parameters before it); call model.eval() or pass "
            "eval_mode=True to HessianOperator.")
    if op in _MULTILINEAR:
        shared = _shared(ins)
        if shared:
            used = [n for i, n in enumerate(names) if shared >> i & 1]
            raise NotPiecewiseLinearError(
                f"module {where} multiplies ({type(node).__name__}) two tensors that both depend "
                f"on {used} (a layer applied twice, tied weights, or x * x): the output is not "
                f"linear in them. {_HINT}")
        return
    if op == "Div" and (len(ins) < 2 or ins[1] == 0):
        return  # the numerator alone depends on the parameters
    raise NotPiecewiseLinearError(
        f"module {where} computes {type(node).__name__}, which is not piecewise linear, on "
        f"a tensor that depends on the selected parameters. {_HINT}")


def uses_outside_owner(out: Tensor, params: dict[str, Tensor],
                       owner_span: dict[str, tuple[int, int]]) -> list[str]:
    """Selected parameters that a node of ``out``'s graph reads outside the recorded call of
    the module owning them (``owner_span``: name -> that call's sequence-number span), e.g.
    ``F.linear(x, self.fc.weight)`` in a parent's forward, or tied weights."""
    name_of = {id(t): n for n, t in params.items()}
    outside = set()
    for node in _post_order(out.grad_fn):
        for child, _ in node.next_functions:
            name = name_of.get(id(getattr(child, "variable", None)))
            if name is None:
                continue
            start, end = owner_span.get(name, (0, -1))
            if not start < node._sequence_nr() < end:  # type: ignore[attr-defined]
                outside.add(name)
    return sorted(outside)


def _or(masks: list[int]) -> int:
    out = 0
    for m in masks:
        out |= m
    return out


def _shared(masks: list[int]) -> int:
    """Bits set in two or more of ``masks``."""
    seen = twice = 0
    for m in masks:
        twice |= seen & m
        seen |= m
    return twice


def _post_order(root: object) -> list[object]:
    """The nodes reachable from ``root``, each after all of its inputs (iterative DFS)."""
    if root is None:
        return []
    order, done, stack = [], set(), [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in done:
            continue
        done.add(node)
        stack.append((node, True))
        stack += [(c, False) for c, _ in node.next_functions if c is not None and c not in done]
    return order
