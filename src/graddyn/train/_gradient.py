"""Gradient steps: how the loop turns a batch into ``p.grad``.

The default is the plain minibatch gradient (backward of the mean per-example loss). A step
that needs per-example gradients (winsorized SGD) captures them itself and writes ``p.grad``;
the trainer only asks for the per-example losses back, to log and to check. ("Rule" is the
engine's word: a per-layer closed form, ``graddyn.register_rule``.)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from graddyn._losses import LossFn, check_losses
from graddyn.train._events import Batch


@runtime_checkable
class GradientStep(Protocol):
    """Fills ``p.grad`` of the model's parameters for one batch; returns the (B,) detached
    per-example losses. ``p.grad`` is set to None before the call.

    A step with state that must survive a resume also defines ``state_dict()`` and
    ``load_state_dict(d)`` (tensors and plain containers only)."""

    def __call__(self, model: nn.Module, loss_fn: LossFn, batch: Batch) -> Tensor: ...


class MeanLoss:
    """The ordinary minibatch gradient: ``mean_i loss_i`` backward. Cost: one forward and one
    backward pass of the batch."""

    def __call__(self, model: nn.Module, loss_fn: LossFn, batch: Batch) -> Tensor:
        losses = loss_fn(model(batch.x), batch.y)  # (B,)
        check_losses(losses, len(batch.y))
        losses.mean().backward()
        return losses.detach()
