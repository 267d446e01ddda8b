"""Winsorized SGD (Chatterjee, "Coherent Gradients", ICLR 2020, section 3).

Instead of the minibatch mean gradient, each parameter coordinate gets the *winsorized* mean
of its B per-example gradient values: the c largest values are set to the (c+1)-th largest,
the c smallest to the (c+1)-th smallest, then the B values are averaged
(reference: ``graddyn._robust.winsorized_mean_rows``; equivalent to clipping at the per-coordinate
"nearest" percentiles 100 c / (B - 1) and 100 (B - 1 - c) / (B - 1), as in the paper's code).
A coordinate thus only moves in a direction that many examples agree on. c = 0 is plain SGD.

Two entry points:
- ``winsorized_gradients(per_example, c)``: the pure function on materialised per-example
  gradients (dict name -> (B, *shape)), column-chunked under a memory budget.
- ``WinsorizedGradient(c)``: the gradient step for a training loop. ``compute(model, x, y,
  loss_fn)`` runs forward, gets per-example gradients from the engine (``graddyn.capture``;
  ``torch.func`` if the engine cannot be imported, or with ``grads_from="func"``), writes the
  winsorized mean into ``p.grad`` and returns the detached per-example losses (B,). Calling
  the object as ``step(model, loss_fn, batch)`` is the ``graddyn.train`` GradientStep
  protocol.

Cost: one forward/backward, the plain per-coordinate sum, and the c + 1 largest and smallest
per-example values per coordinate (``winsorized_mean`` of a ``BatchGrads``). With the compiled
kernel (numba; ``graddyn._kernels.winsorize``) Linear layers are never materialised and the
rest is materialised in row blocks within ``memory_budget_bytes``; without it (kernels
switched off, numba missing, not CPU) the sorting reference runs on the blocks. Speed:
``docs/benchmarks_winsorize.md``.

>>> model = torch.nn.Linear(3, 2)
>>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
>>> losses = WinsorizedGradient(c=1).compute(model, x, y, per_example_cross_entropy)
>>> model.weight.grad.shape, losses.shape
(torch.Size([2, 3]), torch.Size([8]))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from graddyn._losses import LossFn, check_losses, per_example_cross_entropy  # noqa: F401 (example)
from graddyn._robust import check_c, winsorized_mean_chunked

DEFAULT_BUDGET = 1 << 23  # 8 MiB: 4 MiB blocks + the kernel's workspace (cache-sized, fast)
GRADS_FROM = ("auto", "capture", "func")
"""Where per-example gradients come from: the engine (``graddyn.capture``), ``torch.func``
(vmap over grad), or "auto": the engine if it can be imported."""


def winsorized_gradients(
    per_example: Mapping[str, Tensor], c: int, memory_budget_bytes: int = DEFAULT_BUDGET
) -> dict[str, Tensor]:
    """name -> winsorized mean over dim 0 of each (B, *shape) tensor, shaped like the param."""
    out = {}
    for name, g in per_example.items():
        flat = g.reshape(g.shape[0], -1)
        out[name] = winsorized_mean_chunked(flat, c, memory_budget_bytes).reshape(g.shape[1:])
    return out


def _func_per_example(
    model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, names: list[str]
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients by torch.func (vmap over grad): (dict name -> (B, *shape), losses)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters() if n in names}
    buffers = dict(model.named_buffers())

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)).sum()

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    with torch.no_grad():
        losses = loss_fn(model(x), y)
    return per, losses.detach()


class WinsorizedGradient:
    """Gradient step: ``p.grad`` (accumulated, like autograd) = winsorized mean of the
    per-example gradients, per coordinate. See the module docstring."""

    def __init__(
        self, c: int, memory_budget_bytes: int = DEFAULT_BUDGET, grads_from: str = "auto"
    ) -> None:
        check_c(c, 2 * c + 1)  # type and sign now; c < B/2 is checked per batch
        if grads_from not in GRADS_FROM:
            raise ValueError(f"grads_from must be 'auto', 'capture' or 'func', got "
                             f"{grads_from!r}")
        if memory_budget_bytes <= 0:
            raise ValueError(f"memory_budget_bytes must be > 0, got {memory_budget_bytes}")
        self.c, self.memory_budget_bytes, self.grads_from = c, memory_budget_bytes, grads_from

    def compute(self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn) -> Tensor:
        """Fill ``p.grad`` for this batch; return the detached (B,) per-example losses."""
        check_c(self.c, x.shape[0])
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.c == 0:  # exactly the ordinary minibatch gradient
            losses = loss_fn(model(x), y)
            check_losses(losses, x.shape[0])
            losses.mean().backward()
            return losses.detach()
        grads, losses = self._winsorized(model, x, y, loss_fn, list(named))
        for name, g in grads.items():
            p = named[name]
            g = g.to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g
        return losses

    def __call__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> Tensor:
        """``graddyn.train`` GradientStep protocol: batch has ``.x`` and ``.y``."""
        return self.compute(model, batch.x, batch.y, loss_fn)

    def _winsorized(
        self, model: nn.Module, x: Tensor, y: Tensor, loss_fn: LossFn, names: list[str]
    ) -> tuple[dict[str, Tensor], Tensor]:
        capture = _engine() if self.grads_from != "func" else None
        if capture is None and self.grads_from == "capture":
            raise RuntimeError("grads_from='capture' but the engine (graddyn.pergrad) cannot "
                               "be imported")
        if capture is None:
            per, losses = _func_per_example(model, x, y, loss_fn, names)
            check_losses(losses, x.shape[0])
            return winsorized_gradients(per, self.c, self.memory_budget_bytes), losses
        from graddyn.interventions._winsorized_mean import winsorized_mean

        with capture(model) as cap:
            losses = loss_fn(model(x), y)
        check_losses(losses, x.shape[0])
        grads = winsorized_mean(cap.backward(losses), self.c, self.memory_budget_bytes)
        return grads, losses.detach()


def _engine() -> Callable[..., Any] | None:
    try:
        from graddyn.pergrad import capture
    except ImportError:
        return None
    return capture
