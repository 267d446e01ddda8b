"""Gradient confusion (Sankararaman, De, Xu, Huang & Goldstein, ICML 2020).

For gradients g_1..g_B (per-example, or one per minibatch) with Gram G_ij = <g_i, g_j>:

    eta        = max(0, -min_{i != j} G_ij)          (the paper's gradient confusion bound)
    min_cosine = min_{i != j} G_ij / (|g_i| |g_j|)

plus quantiles and a fixed-bin histogram on [-1, 1] of the B(B-1)/2 pairwise cosines. A zero
gradient has cosine 0 with everything (no direction to agree or disagree with).

Two forms: ``confusion_from_gram`` / the ``Confusion`` instrument use the engine's Gram of
per-example gradients (cost: one Gram, O(B^2) memory per batch, no B x P); the minibatch form
``minibatch_gradient`` + ``confusion_from_vectors`` compares whole minibatch gradients from
separate autograd passes, so it works with batch norm in training mode (the paper's
"pairs of minibatch gradients"). Streaming over batches pools the pairs of every batch
(pairs never cross batches); the cosines are kept (B(B-1)/2 floats per update) so quantiles
are exact.

>>> g = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0]])
>>> confusion_from_gram(g @ g.T)["eta"]
1.0
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from graddyn._gram import cosine_matrix, host64, host_pairs, upper_flat
from graddyn._kernels import pair_kernels
from graddyn.instruments._base import Instrument, Probe, empty_error, require_grads

Tensor = torch.Tensor

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
NUM_BINS = 20


def pairwise_cosines(gram: Tensor | np.ndarray) -> tuple[Tensor, Tensor]:
    """Off-diagonal inner products and cosines (upper triangle, i < j, row-major) of a (B, B)
    Gram -> two (B(B-1)/2,) float64 CPU tensors."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 2:
        raise ValueError(f"need a square Gram of at least 2 gradients, got {tuple(gram.shape)}")
    g = host64(gram)
    inner, cos = _upper_pairs(g, cosine_matrix(g))
    return torch.from_numpy(inner), torch.from_numpy(cos)


def _upper_pairs(gram: np.ndarray, cos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (B(B-1)/2,) entries i < j (row-major) of a (B, B) Gram and its cosine matrix."""
    jit = pair_kernels()
    if jit is not None:  # one compiled pass for both
        return jit.upper_pairs(gram, cos)
    flat = upper_flat(gram.shape[0])  # positions i B + j, i < j
    return np.take(gram, flat), np.take(cos, flat)


def cosine_histogram(cos: Tensor | np.ndarray, num_bins: int = NUM_BINS) -> Tensor:
    """Counts of cosines in ``num_bins`` equal bins [e_k, e_k+1) on [-1, 1] (1.0 falls in the
    last bin)."""
    return _histogram_sorted(np.sort(host64(cos)), num_bins)


def _histogram_sorted(s: np.ndarray, num_bins: int) -> Tensor:
    """``cosine_histogram`` of already sorted values: bin edges by binary search."""
    edges = -1.0 + 2.0 * np.arange(1, num_bins) / num_bins  # inner edges e_1 .. e_{nb-1}
    cuts = np.searchsorted(s, edges, side="left")  # values below each edge
    return torch.from_numpy(np.diff(np.concatenate([[0], cuts, [s.size]])))


def _quantiles_sorted(s: np.ndarray, quantiles: Sequence[float]) -> list[float]:
    n = s.size
    out = []
    for q in quantiles:
        pos = q * (n - 1)
        lo = min(int(math.floor(pos)), n - 1)
        hi = min(lo + 1, n - 1)
        a, b = float(s[lo]), float(s[hi])
        out.append(a + (pos - lo) * (b - a))
    return out


@functools.lru_cache(maxsize=32)
def _quantile_keys(quantiles: tuple[float, ...]) -> tuple[str, ...]:
    """Result keys ``cos_q{100 q:g}`` (formatted once: this runs every measured step)."""
    return tuple(f"cos_q{100 * q:g}" for q in quantiles)


def confusion_stats(
    inner: Tensor | np.ndarray, cos: Tensor | np.ndarray,
    quantiles: Sequence[float] = QUANTILES, num_bins: int = NUM_BINS,
) -> dict[str, Any]:
    """eta, min/mean cosine, quantiles ``cos_q{100q:g}`` and ``cos_hist`` from pair values
    (computed on the host in float64, from one sort; compiled where numba is available)."""
    inner, s = host64(inner), np.sort(host64(cos))
    jit = pair_kernels()
    if jit is not None and s.size and num_bins >= 1:
        numbers, hist = jit.confusion_numbers(inner, s, np.asarray(quantiles, np.float64),
                                              num_bins)
        min_inner, min_cos, mean_cos, *qs = numbers.tolist()
        counts = torch.from_numpy(hist)
    else:
        min_inner, min_cos, mean_cos = float(inner.min()), float(s[0]), float(s.mean())
        qs = _quantiles_sorted(s, quantiles)
        counts = _histogram_sorted(s, num_bins)
    out: dict[str, Any] = {
        "eta": max(0.0, -min_inner),
        "min_inner": min_inner,
        "min_cosine": min_cos,
        "mean_cosine": mean_cos,
    }
    out.update(zip(_quantile_keys(tuple(quantiles)), qs))
    out["cos_hist"] = counts
    out["num_pairs"] = s.size
    return out


def confusion_from_gram(gram: Tensor, **kw: Any) -> dict[str, Any]:
    """All confusion statistics of one batch from its (B, B) Gram matrix."""
    return confusion_stats(*pairwise_cosines(gram), **kw)


def _flat(v: Tensor | Mapping[str, Tensor]) -> Tensor:
    if isinstance(v, Mapping):
        return torch.cat([t.reshape(-1) for t in v.values()])
    return v.reshape(-1)


def confusion_from_vectors(
    vectors: Sequence[Tensor | Mapping[str, Tensor]], disjoint_pairs: bool = False, **kw: Any
) -> dict[str, Any]:
    """Confusion over gradient vectors (flat tensors or dicts name -> tensor).

    ``disjoint_pairs=False``: all k(k-1)/2 pairs. ``True``: only the pairs (v0, v1), (v2, v3),
    ... (the paper's "pairs of minibatch gradients", independent of each other)."""
    if len(vectors) < 2:
        raise ValueError(f"need at least 2 gradient vectors, got {len(vectors)}")
    m = torch.stack([_flat(v) for v in vectors])  # (k, P)
    if not disjoint_pairs:
        return confusion_from_gram(m @ m.T, **kw)
    a, b = m[0 : len(m) - 1 : 2], m[1::2]
    inner = (a * b).sum(1)
    denom = a.norm(dim=1) * b.norm(dim=1)
    cos = torch.where(denom > 0, inner / denom.clamp_min(torch.finfo(m.dtype).tiny), 0.0)
    return confusion_stats(inner, cos.clamp(-1.0, 1.0), **kw)


def minibatch_gradient(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """The mean-loss gradient of one minibatch, name -> tensor, in the model's current mode
    (batch norm in training mode is fine). ``loss_fn(outputs, y)`` returns a scalar or (B,)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = loss_fn(model(x), y)
    loss = loss.mean() if loss.dim() else loss
    grads = torch.autograd.grad(loss, [p for _, p in named])
    return {n: g.detach() for (n, _), g in zip(named, grads)}


class Confusion(Instrument, name="confusion"):
    """Per-example gradient confusion pooled over the pairs of every batch since ``reset``.

    Keys: eta, min_inner, min_cosine, mean_cosine, cos_q1 .. cos_q99, cos_hist (tensor of
    ``num_bins`` counts on [-1, 1]), num_pairs.
    """

    def __init__(self, quantiles: Sequence[float] = QUANTILES, num_bins: int = NUM_BINS) -> None:
        self.quantiles, self.num_bins = tuple(quantiles), num_bins
        self.add_state("_inner", [], "cat")  # per batch: (B(B-1)/2,) inner products, i < j
        self.add_state("_cos", [], "cat")  # per batch: the same pairs' cosines

    def update(self, probe: Probe) -> None:
        gram, cos = host_pairs(require_grads(probe, "Confusion"))  # (B, B) float64
        if gram.shape[0] < 2:
            raise ValueError(f"need a square Gram of at least 2 gradients, got {gram.shape}")
        inner, cosines = _upper_pairs(gram, cos)
        self._inner.append(inner)
        self._cos.append(cosines)

    def compute(self) -> dict[str, Any]:
        if not self._cos:
            raise empty_error("Confusion")

        def joined(parts: list[np.ndarray]) -> np.ndarray:  # one batch (every step): no copy
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        return confusion_stats(joined(self._inner), joined(self._cos), self.quantiles,
                               self.num_bins)
