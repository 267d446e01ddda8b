"""Slow, obviously correct per-example gradients: one ``torch.autograd.grad`` per example.

Use it to check the engine (``graddyn.pergrad``) or any instrument built on it, in float64.
Cost: B forward+backward passes of batch size 1.

>>> model = torch.nn.Linear(3, 2)
>>> x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
>>> g = per_example_grads(model, torch.nn.functional.cross_entropy, x, y)
>>> g["weight"].shape
torch.Size([4, 2, 3])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from ._robust import winsorized_mean_rows

__all__ = ["DenseBatchGrads", "dense_batch_grads", "per_example_grads",
           "per_example_output_grads", "per_loss_grads"]


def _selected(model: nn.Module, params: object) -> dict[str, nn.Parameter]:
    named = dict(model.named_parameters())
    if params is None:
        return {k: p for k, p in named.items() if p.requires_grad}
    from .pergrad._select import resolve_params

    ids = resolve_params(model, params)
    return {k: p for k, p in named.items() if id(p) in ids}


def _grads(out: Tensor, params: dict[str, nn.Parameter]) -> list[Tensor]:
    gs = torch.autograd.grad(out, list(params.values()), allow_unused=True, retain_graph=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(gs, params.values())]


def per_example_grads(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                      inputs: Tensor, targets: Tensor, params: object = None
                      ) -> dict[str, Tensor]:
    """g_b = d loss_fn(model(x_b), y_b) / d theta for each b -> dict name -> (B, *shape).

    ``loss_fn`` gets a batch of one; any reduction works (a (1,) loss is summed)."""
    ps = _selected(model, params)
    rows = []
    for b in range(inputs.shape[0]):
        loss = loss_fn(model(inputs[b:b + 1]), targets[b:b + 1]).sum()
        rows.append(_grads(loss, ps))
    return {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(ps)}


def per_loss_grads(model: nn.Module, losses: Tensor, params: object = None
                   ) -> dict[str, Tensor]:
    """d losses[i] / d theta for each i, from the batched forward that built ``losses`` ->
    dict name -> (*losses.shape, *shape). One ``torch.autograd.grad`` per entry (the graph is
    kept), so the forward's dropout masks, batch statistics and any coupling of the examples
    are those of that one pass: the reference for everything the engine computes.

    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.5))
    >>> losses = model(torch.randn(4, 3)).sum(1)           # (B,)
    >>> per_loss_grads(model, losses)["0.weight"].shape
    torch.Size([4, 2, 3])
    """
    ps = _selected(model, params)
    flat = losses.reshape(-1)
    rows = [_grads(flat[i], ps) for i in range(flat.numel())]
    return {k: torch.stack([r[i] for r in rows]).reshape(*losses.shape, *p.shape)
            for i, (k, p) in enumerate(ps.items())}


def per_example_output_grads(model: nn.Module, inputs: Tensor, params: object = None
                             ) -> dict[str, Tensor]:
    """d f_k(x_b) / d theta for each example b and output k -> dict name -> (B, K, *shape)."""
    ps = _selected(model, params)
    rows = []
    for b in range(inputs.shape[0]):
        out = model(inputs[b:b + 1]).reshape(-1)
        rows.append([torch.stack(g) for g in zip(*[_grads(o, ps) for o in out])])
    return {k: torch.stack([r[i] for r in rows]) for i, k in enumerate(ps)}


class DenseBatchGrads:
    """The ``BatchGrads`` interface over materialised grads dict name -> (*batch_shape, *shape).

    Every method flattens to (rows, P) and uses plain matrix products.
    """

    def __init__(self, grads: dict[str, Tensor], batch_shape: tuple[int, ...]) -> None:
        self._g = grads
        self.batch_shape = tuple(batch_shape)

    @property
    def names(self) -> list[str]:
        return list(self._g)

    def _flat(self, k: str) -> Tensor:
        n = 1
        for d in self.batch_shape:
            n *= d
        return self._g[k].reshape(n, -1)

    def norms(self, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        sq = {k: (self._flat(k) ** 2).sum(1).reshape(self.batch_shape) for k in self._g}
        if per_layer:
            return {k: v.sqrt() for k, v in sq.items()}
        return sum(sq.values()).sqrt()

    def gram(self, per_layer: bool = False) -> Tensor | dict[str, Tensor]:
        return self.cross_gram(self, per_layer)

    def cross_gram(self, other: object, per_layer: bool = False) -> Tensor | dict:
        dense = other.materialize()
        shape = self.batch_shape + tuple(other.batch_shape)
        res = {k: (self._flat(k) @ dense[k].reshape(-1, self._flat(k).shape[1]).T
                   ).reshape(shape) for k in self._g}
        return res if per_layer else sum(res.values())

    def sum(self) -> dict[str, Tensor]:
        nb = len(self.batch_shape)
        return {k: v.sum(0) if nb == 1 else v.sum(0) for k, v in self._g.items()}

    def materialize(self, chunk_size: int | None = None
                    ) -> dict[str, Tensor] | Iterator[dict[str, Tensor]]:
        if chunk_size is None:
            return dict(self._g)
        flat = {k: v.reshape(-1, *v.shape[len(self.batch_shape):]) for k, v in self._g.items()}
        n = next(iter(flat.values())).shape[0]
        return ({k: v[s:s + chunk_size] for k, v in flat.items()} for s in range(0, n, chunk_size))

    def winsorized_mean(self, c: int, memory_budget_bytes: int = 0) -> dict[str, Tensor]:
        return {k: winsorized_mean_rows(self._flat(k), c).reshape(v.shape[1:])
                for k, v in self._g.items()}


def dense_batch_grads(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor],
                      inputs: Tensor, targets: Tensor, params: object = None
                      ) -> DenseBatchGrads:
    """:class:`DenseBatchGrads` of :func:`per_example_grads` (batch shape (B,))."""
    return DenseBatchGrads(per_example_grads(model, loss_fn, inputs, targets, params),
                           (inputs.shape[0],))
