"""Reverse-over-reverse Hessian products that reuse the gradient graph (PyHessian's scheme).

``g = autograd.grad(L, theta, create_graph=True)`` is built once per batch; then each vector
costs one double-backward,
``H v = autograd.grad(g, theta, grad_outputs=v, retain_graph=True)``. Against
forward-over-reverse (``jvp`` of ``grad``, which recomputes forward + backward for every call),
this saves the primal passes on every mat-vec.
Memory: the retained graph holds the activations of the batch plus the backward's saved tensors
(~2-3x a training step's activations), kept per batch while cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

LossFn = Callable[[Tensor, Tensor], Tensor]


LOOP_MIN_FLOPS = 5e8
"""Forward FLOPs of one batch from which, on the CPU, a loop of double-backwards (graph mode)
is the faster way to apply the Hessian to a block of vectors: the MNIST CNN (3.1 GFLOP) is
faster in the loop, the 3x256 MLP (86 MFLOP) and smaller nets faster vmapped
(forward-over-reverse; a loop pays the per-op overhead of autograd once per vector).
Measured in ``docs/benchmarks_curvature.md``."""


def forward_flops(model: nn.Module, x: Any) -> int:
    """FLOPs of ``model(x)`` in its Linear and Conv layers (``2 * outputs * fan_in``), from
    one forward pass without gradients; other layers are not counted."""
    total = [0]

    def count(m: nn.Module, _args: tuple, out: Any) -> None:
        if isinstance(out, Tensor):
            fan_in = m.weight[0].numel()  # in_features, or Cin/groups * kernel size
            total[0] += 2 * out.numel() * fan_in

    layers = [m for m in model.modules()
              if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    handles = [m.register_forward_hook(count) for m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total[0]


def weights_key(model: nn.Module) -> tuple[tuple[int, int, int], ...]:
    """Identity of the model's current weights and buffers: changes when any is updated in place
    (optimizer steps bump ``_version``) or replaced, so a cached graph is known to be stale."""
    tensors = [*model.parameters(), *model.buffers()]
    return tuple((id(t), t.data_ptr(), t._version) for t in tensors)


class GradGraph:
    """The gradient ``g(theta)`` of one batch's loss, with its graph kept for double-backward.

    Built from detached leaf copies of the selected parameters (the others are frozen), so it
    never writes ``p.grad`` and never differentiates through unselected parameters.
    Cost to build: one forward + one backward with ``create_graph=True``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, x: Any, y: Tensor,
                 names: list[str]) -> None:
        named = dict(model.named_parameters())
        frozen: dict[str, Tensor] = {n: t.detach() for n, t in named.items() if n not in names}
        frozen.update(model.named_buffers())
        self.theta = [named[n].detach().requires_grad_(True) for n in names]
        with torch.enable_grad():
            out = functional_call(model, {**frozen, **dict(zip(names, self.theta))}, (x,))
            loss = loss_fn(out, y)
            self.grads = torch.autograd.grad(loss, self.theta, create_graph=True)

    def hvp(self, vs: list[Tensor]) -> list[Tensor]:
        """``H v`` per parameter for one vector: ``vs[i]`` has the shape of parameter ``i``.

        One plain double-backward (PyHessian's scheme). On the CPU a loop of these beats the
        vmapped forward-over-reverse on the CNN of ``benchmarks/curvature.py`` (1.7x; vmapped
        convolutions with batched weight tangents are slow) but not on small or matmul-bound
        nets (see ``LOOP_MIN_FLOPS``); a vmapped double-backward (``is_grads_batched``) was
        slower than both (2.3x on the MLP), so it is not offered.
        """
        live = [i for i, g in enumerate(self.grads) if g.requires_grad]
        if not live:  # the gradient is constant in theta: H = 0
            return [torch.zeros_like(v) for v in vs]
        with torch.enable_grad():
            out = torch.autograd.grad([self.grads[i] for i in live], self.theta,
                                      [vs[i] for i in live], retain_graph=True,
                                      allow_unused=True)
        return [_zeros_if_none(o, t) for o, t in zip(out, self.theta)]


def _zeros_if_none(o: Tensor | None, t: Tensor) -> Tensor:
    """A parameter on which the gradient does not depend (e.g. a last-layer bias with a linear
    loss in it) has a zero Hessian block; autograd reports it as ``None``."""
    return torch.zeros_like(t) if o is None else o.detach()
