"""Small model helpers other packages rely on."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier layer: the last ``nn.Linear`` in ``model.named_modules()`` order.

    Returns ``(qualified_name, layer)``, e.g. ``("head", Linear(...))`` for a ResNet or
    ``("2", Linear(...))`` for a one-hidden-layer MLP. Used by optimum shifting and
    last-layer TracIn. Every model of :data:`MODELS` registers its head last.
    """
    found: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer; optimum shifting and "
                         "last-layer influence need a linear classifier layer")
    return found


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024,
             loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None
             ) -> tuple[float, float | None]:
    """``(mean loss, accuracy)`` of ``model`` in eval mode (restored after) on ``x (N, ...)``,
    ``y (N,)``, ``batch_size`` at a time. ``loss_fn(outputs, targets)``: per-example losses
    (b,) (default cross-entropy); accuracy None unless all outputs are logits (b, K)."""
    was_training = model.training
    model.eval()
    loss, correct, is_cls = 0.0, 0, True
    try:
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            out = model(xb)  # (b, K) logits, or (b, ...) outputs of a regression
            loss += float(F.cross_entropy(out, yb, reduction="sum") if loss_fn is None
                          else loss_fn(out, yb).sum())
            is_cls = is_cls and out.dim() == 2 and not yb.is_floating_point()
            if is_cls:
                correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was_training)
    return loss / len(y), correct / len(y) if is_cls else None
