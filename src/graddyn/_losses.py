"""Per-example losses, shared by the loop, the interventions and influence: a loss function
maps (outputs (B, ...), targets (B,)) to per-example losses (B,)."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

LossFn = Callable[[Tensor, Tensor], Tensor]


def per_example_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy per example: (B, K) logits, (B,) labels -> (B,)."""
    return F.cross_entropy(outputs, targets, reduction="none")


def check_losses(losses: Tensor, batch_size: int) -> None:
    """Refuse a loss that is not per-example: everything that uses it needs (B,)."""
    if losses.shape != (batch_size,):
        raise ValueError(
            f"loss_fn must return per-example losses of shape ({batch_size},), got "
            f"{tuple(losses.shape)}; use reduction='none' (e.g. per_example_cross_entropy)"
        )
