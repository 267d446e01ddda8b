"""Instruments on the *training* minibatch, from the training step's own backward pass.

``measured_backward`` is the plain minibatch gradient (what ``MeanLoss`` gives) computed
through ``graddyn.capture``: one forward, one backward to the layer outputs, then
``p.grad = sum_n g_n / B`` from the factors (the same matmuls autograd would do) and the
per-example gradients of the same batch (``BatchGrads``: Gram, norms, ...) for free. The
extra cost over a plain step is what the instruments ask for (e.g. the Gram: for an MLP
layer two (B, B) products), not a second pass.

Use it in your own loop::

    losses, grads, outputs = measured_backward(model, loss_fn, x, y)   # p.grad is set
    confusion.update(Probe(grads=grads, losses=losses, outputs=outputs, targets=y))
    optimizer.step()

The ``Trainer`` does this for its ``batch_instruments`` on the steps they are due: its
gradient step there is ``MeasuredMean``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from graddyn._losses import LossFn, check_losses
from graddyn.instruments._base import Probe
from graddyn.train._probes import measure

if TYPE_CHECKING:
    from graddyn.pergrad import Capture


def measured_backward(model: nn.Module, loss_fn: LossFn, x: Any, y: Tensor,
                      overwrite: bool = False, write: bool = True,
                      cap: Capture | None = None) -> tuple[Tensor, Any, Tensor]:
    """Adds the mean-loss gradient to ``p.grad`` (like ``loss_fn(model(x), y).mean()
    .backward()``; ``overwrite=True``: writes it over ``p.grad``, like ``zero_grad(
    set_to_none=False)`` first) and returns ``(losses (B,), BatchGrads of the unscaled
    per-example losses, outputs)``, both tensors detached. Existing ``p.grad`` buffers are
    updated in place (see ``BatchGrads.write_grad``). ``write=False`` leaves ``p.grad``
    alone: call ``grads.write_grad(1 / B, overwrite)`` yourself, e.g. after measuring (the
    factors the Gram needs are then still in cache). ``cap``: an open ``capture(model)``
    to reuse (it is rearmed; its hooks stay installed between steps), else a fresh one.
    With a ``cap`` of a ``process_group`` (DDP), the BatchGrads and ``p.grad`` (the mean
    gradient) are the global batch's; the losses and outputs stay this rank's
    (``cap.gather`` them)."""
    if cap is None:
        from graddyn.pergrad import capture

        with capture(model) as fresh:
            return _measured(fresh, model, loss_fn, x, y, overwrite, write)
    cap.rearm()
    return _measured(cap, model, loss_fn, x, y, overwrite, write)


def _measured(cap: Capture, model: nn.Module, loss_fn: LossFn, x: Any, y: Tensor,
              overwrite: bool, write: bool) -> tuple[Tensor, Any, Tensor]:
    outputs = model(x)
    losses = loss_fn(outputs, y)  # (B,)
    check_losses(losses, len(y))
    grads = cap.backward(losses)  # covers every parameter with requires_grad (capture's default)
    if write:
        grads.write_grad(scale=1.0 / grads.batch_shape[0], overwrite=overwrite)  # global B
    return losses.detach(), grads, outputs.detach()


class MeasuredMean:
    """``MeanLoss`` on a batch where batch instruments are due: ``measured_backward``
    through the trainer's open ``cap``, the ``due`` instruments measure its per-example
    gradients (``results`` until the step is recorded), then ``p.grad = sum_n g_n / B`` is
    written over last step's buffers (the trainer does not zero them: one fused ``addmm``,
    no fresh pages). ``gather``: every rank's rows under DDP (the global batch), else
    identity; ``check(losses)`` raises on the global batch's losses before anything is
    measured or written. Returns the global batch's losses (B,)."""

    def __init__(self, due: list[Any], cap: Capture | None, step: int,
                 gather: Callable[[Tensor], Tensor], check: Callable[[Tensor], None]) -> None:
        self.due, self.cap, self.step, self.gather, self.check = due, cap, step, gather, check
        self.results: tuple[dict[str, float], dict[str, Any]] | None = None

    def __call__(self, model: nn.Module, loss_fn: LossFn, batch: Any) -> Tensor:
        losses, grads, outputs = measured_backward(model, loss_fn, batch.x, batch.y,
                                                   write=False, cap=self.cap)
        everyone, outputs, targets, rows = (self.gather(t) for t in (
            losses, outputs, batch.y, batch.indices))
        self.check(everyone)
        # measured before p.grad is written: the Gram's factors are still in cache
        self.results = measure(self.due, [Probe(
            grads=grads, losses=everyone, outputs=outputs, targets=targets, indices=rows,
            step=self.step, model=model)])
        grads.write_grad(scale=1.0 / len(rows), overwrite=True)
        return everyone
