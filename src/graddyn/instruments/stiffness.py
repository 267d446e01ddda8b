"""Stiffness (Fort, Nowak, Jastrzebski & Narayanan 2019, "Stiffness: a new perspective on
generalization in neural networks").

For per-example loss gradients g_i, g_j of distinct examples i != j:

    sign stiffness   S_sign(i, j) = sign(<g_i, g_j>)          in {-1, 0, 1}
    cosine stiffness S_cos(i, j)  = <g_i, g_j> / (|g_i| |g_j|) in [-1, 1]

averaged over pairs. The class x class matrices average over pairs with y_i = a, y_j = b
(ordered pairs, i != j, so they are symmetric); "within" pools pairs of equal labels and
"between" pairs of different labels. Everything comes from the (B, B) Gram and the labels;
streaming pools the within-batch pairs of all batches (sums and pair counts per class pair).
Cost per update: one Gram, O(B^2 + K^2).

>>> g = torch.tensor([[1.0, 0.0], [2.0, 0.0], [-1.0, 0.0]])
>>> stiffness_sums(g @ g.T, torch.tensor([0, 0, 1]), 2)[1]
tensor([[ 2., -2.],
        [-2.,  0.]])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from graddyn._gram import cosine_matrix_np, host64, host_pairs
from graddyn.instruments._base import INSTRUMENTS, Instrument, Probe
from graddyn.instruments.coherence import empty_error, require_grads

Tensor = torch.Tensor


def stiffness_sums(
    gram: Tensor | np.ndarray, labels: Tensor, num_classes: int,
    cosines: Tensor | np.ndarray | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per class pair (a, b): sums of cosine and of sign stiffness, and ordered-pair counts,
    each (K, K) float64 on the CPU, over pairs i != j of one batch. ``cosines``: the Gram's
    (B, B) cosine matrix if already at hand.

    Computed on the host with NumPy: O(B^2 K) work in a handful of calls, where torch's
    per-call dispatch would dominate at B = 100 (this runs every training step)."""
    b = gram.shape[0]
    if labels.shape != (b,):
        raise ValueError(f"labels must be ({b},) to match the Gram, got {tuple(labels.shape)}")
    y = labels.detach().cpu().numpy().astype(np.int64, copy=False)
    if b < 2:
        raise ValueError(f"need a square Gram of at least 2 gradients, got {tuple(gram.shape)}")
    if y.max() >= num_classes or y.min() < 0:
        raise ValueError(f"labels must lie in [0, {num_classes}); pass num_classes=K")
    g = host64(gram)
    cos = cosine_matrix_np(g) if cosines is None else host64(cosines)
    pairs = np.stack([cos, np.sign(g)])  # (2, B, B) cosine, sign
    idx = np.arange(b)
    pairs[:, idx, idx] = 0.0  # i = j pairs are excluded
    onehot = np.zeros((b, num_classes))
    onehot[idx, y] = 1.0  # (B, K)
    cos_sum, sign_sum = onehot.T @ pairs @ onehot  # (2, K, K)
    n = onehot.sum(0)  # (K,) examples per class
    counts = np.outer(n, n) - np.diag(n)  # ordered pairs i != j per class pair
    return torch.from_numpy(cos_sum), torch.from_numpy(sign_sum), torch.from_numpy(counts)


def stiffness_from_sums(cos: Tensor, sign: Tensor, counts: Tensor) -> dict[str, Any]:
    """Means from class-pair sums: within / between / overall, and the class x class matrices
    (NaN where a class pair has no pairs)."""
    sums = np.stack([host64(counts), host64(cos), host64(sign)])  # (3, K, K)
    (n_all, c_all, s_all) = sums.sum((1, 2)).tolist()
    (n_in, c_in, s_in) = np.trace(sums, axis1=1, axis2=2).tolist()

    def ratio(s: float, n: float) -> float:
        return s / n if n > 0 else float("nan")

    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(sums[0] > 0, sums[1:] / sums[0], np.nan)  # (2, K, K)
    out: dict[str, Any] = {}
    for k, (key, s_tot, s_in_) in enumerate((("cosine", c_all, c_in), ("sign", s_all, s_in))):
        out[f"{key}_within"] = ratio(s_in_, n_in)
        out[f"{key}_between"] = ratio(s_tot - s_in_, n_all - n_in)
        out[f"{key}"] = ratio(s_tot, n_all)
        out[f"{key}_matrix"] = torch.from_numpy(means[k])
    return out
@INSTRUMENTS.register("stiffness")
class Stiffness(Instrument):
    """Sign and cosine stiffness pooled over within-batch pairs; needs ``Probe.targets``.

    Keys: cosine, cosine_within, cosine_between, cosine_matrix (K, K), and the same for
    sign. ``num_classes=None`` grows K to the largest label seen.
    """

    name = "stiffness"

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self.reset()

    def reset(self) -> None:
        self._sums: list[Tensor] | None = None

    def update(self, probe: Probe) -> None:
        gram, cos = host_pairs(require_grads(probe, "Stiffness"))  # (B, B) float64
        if probe.targets is None:
            raise ValueError("Stiffness needs labels: pass Probe(targets=y, ...)")
        k = self.num_classes or int(probe.targets.max()) + 1
        if self._sums is not None and not self.num_classes and self._sums[0].shape[0] > k:
            k = self._sums[0].shape[0]
        new = stiffness_sums(gram, probe.targets, k, cos)
        if self._sums is None:
            self._sums = list(new)
            return
        old_k = self._sums[0].shape[0]
        for idx, t in enumerate(new):
            grown = torch.zeros_like(t)
            grown[:old_k, :old_k] = self._sums[idx]
            self._sums[idx] = grown + t

    def compute(self) -> dict[str, Any]:
        if self._sums is None:
            raise empty_error("Stiffness")
        return stiffness_from_sums(*self._sums)
