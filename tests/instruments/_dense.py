"""A dense (B, P) test double of ``BatchGrads`` and a float64 per-example gradient loop.

Tests compute per-example gradients the obvious way (one ``torch.autograd.grad`` per example)
and wrap them here, so instruments are checked without the engine.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


class DenseGrads:
    """The public ``BatchGrads`` methods over an explicit dict name -> (B, *shape)."""

    def __init__(self, per_example: dict[str, torch.Tensor]) -> None:
        self.per_example = per_example
        self.names = list(per_example)

    @property
    def flat(self) -> torch.Tensor:  # (B, P)
        b = next(iter(self.per_example.values())).shape[0]
        return torch.cat([g.reshape(b, -1) for g in self.per_example.values()], dim=1)

    def norms(self) -> torch.Tensor:
        return self.flat.norm(dim=1)

    def gram(self, per_layer: bool = False):
        if per_layer:
            return {n: g.flatten(1) @ g.flatten(1).T for n, g in self.per_example.items()}
        return self.flat @ self.flat.T

    def cross_gram(self, other: DenseGrads) -> torch.Tensor:
        return self.flat @ other.flat.T

    def sum(self) -> dict[str, torch.Tensor]:
        return {n: g.sum(0) for n, g in self.per_example.items()}

    def materialize(self, chunk_size: int | None = None):
        if chunk_size is None:
            return dict(self.per_example)
        return self._chunks(chunk_size)

    def _chunks(self, chunk_size: int) -> Iterator[dict[str, torch.Tensor]]:
        b = next(iter(self.per_example.values())).shape[0]
        for a in range(0, b, chunk_size):
            yield {n: g[a : a + chunk_size] for n, g in self.per_example.items()}


def tiny_mlp(d_in: int = 5, hidden: int = 4, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """dict name -> (B, *shape) by a plain loop over examples (cross-entropy loss)."""
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    rows = []
    for i in range(x.shape[0]):
        loss = nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, params))
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


def dense_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> DenseGrads:
    return DenseGrads(per_example_grads(model, x, y))


def random_batch(b: int = 8, d_in: int = 5, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_in, generator=g), torch.randint(0, classes, (b,), generator=g)
