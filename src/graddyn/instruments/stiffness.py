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
        [-2.,  0.]], dtype=torch.float64)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from graddyn._gram import cosine_matrix, host64, host_pairs
from graddyn._kernels import pair_kernels
from graddyn.instruments._base import Instrument, Probe, empty_error, require_grads

Tensor = torch.Tensor


def stiffness_sums(
    gram: Tensor | np.ndarray, labels: Tensor, num_classes: int,
    cosines: Tensor | np.ndarray | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per class pair (a, b): sums of cosine and of sign stiffness, and ordered-pair counts,
    each (K, K) float64 on the CPU, over pairs i != j of one batch. ``cosines``: the Gram's
    (B, B) cosine matrix if already at hand."""
    return tuple(torch.from_numpy(s) for s in _sums(gram, labels, num_classes, cosines))


def _sums(gram: Tensor | np.ndarray, labels: Tensor, num_classes: int,
          cosines: Tensor | np.ndarray | None = None) -> np.ndarray:
    """``stiffness_sums`` as one (3, K, K) float64 array (cosine, sign, counts).

    Computed on the host: compiled (``graddyn._kernels.pairs_jit``) where numba is available,
    else the reference ``_sums_numpy``; O(B^2 K) work in a handful of calls either way, where
    torch's per-call dispatch would dominate at B = 100 (this runs every training step)."""
    b = gram.shape[0]
    if labels.shape != (b,):
        raise ValueError(f"labels must be ({b},) to match the Gram, got {tuple(labels.shape)}")
    y = labels.detach().cpu().numpy().astype(np.int64, copy=False)
    if b < 2:
        raise ValueError(f"need a square Gram of at least 2 gradients, got {tuple(gram.shape)}")
    g = host64(gram)
    cos = cosine_matrix(g) if cosines is None else host64(cosines)
    jit = pair_kernels()
    if jit is not None:
        sums = jit.stiffness_sums(g, cos, y, num_classes)  # empty if a label is out of range
        if len(sums):
            return sums
    elif y.min() >= 0 and y.max() < num_classes:
        return _sums_numpy(g, cos, y, num_classes)
    raise ValueError(f"labels must lie in [0, {num_classes}); pass num_classes=K")


def _sums_numpy(g: np.ndarray, cos: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The reference: class-pair sums as one-hot products, (3, K, K)."""
    b = g.shape[0]
    pairs = np.stack([cos, np.sign(g)])  # (2, B, B) cosine, sign
    idx = np.arange(b)
    pairs[:, idx, idx] = 0.0  # i = j pairs are excluded
    onehot = np.zeros((b, k))
    onehot[idx, y] = 1.0  # (B, K)
    n = onehot.sum(0)  # (K,) examples per class
    counts = np.outer(n, n) - np.diag(n)  # ordered pairs i != j per class pair
    return np.concatenate([onehot.T @ pairs @ onehot, counts[None]])


def stiffness_from_sums(cos: Tensor, sign: Tensor, counts: Tensor) -> dict[str, Any]:
    """Means from class-pair sums: within / between / overall, and the class x class matrices
    (NaN where a class pair has no pairs)."""
    return _means(np.stack([host64(cos), host64(sign), host64(counts)]))


def _means(sums: np.ndarray) -> dict[str, Any]:
    """``stiffness_from_sums`` of one (3, K, K) float64 array (cosine, sign, counts)."""
    jit = pair_kernels()
    scalars, means = jit.stiffness_means(sums) if jit is not None else _means_numpy(sums)
    out: dict[str, Any] = {}
    for k, key in enumerate(("cosine", "sign")):
        s, s_in, s_between = scalars[3 * k : 3 * k + 3].tolist()
        out[f"{key}_within"] = s_in
        out[f"{key}_between"] = s_between
        out[key] = s
        out[f"{key}_matrix"] = torch.from_numpy(means[k])
    return out


def _means_numpy(sums: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference of ``pairs_jit.stiffness_means``: (scalars (6,), means (2, K, K))."""
    c_all, s_all, n_all = sums.sum((1, 2)).tolist()
    c_in, s_in, n_in = np.trace(sums, axis1=1, axis2=2).tolist()

    def ratio(s: float, n: float) -> float:
        return s / n if n > 0 else float("nan")

    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(sums[2] > 0, sums[:2] / sums[2], np.nan)  # (2, K, K)
    scalars = [ratio(c_all, n_all), ratio(c_in, n_in), ratio(c_all - c_in, n_all - n_in),
               ratio(s_all, n_all), ratio(s_in, n_in), ratio(s_all - s_in, n_all - n_in)]
    return np.array(scalars), means


def _add_sums(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    """Two (3, K, K) class-pair sums, the smaller K padded with zeros (classes not seen).
    Adds into ``a`` (the caller's fresh sums or its own state); ``b`` is never written."""
    if a is None or b is None:
        return b if a is None else a
    if a.shape[1] < b.shape[1]:
        a, b = b.copy(), a
    k = b.shape[1]
    a[:, :k, :k] += b
    return a


class Stiffness(Instrument, name="stiffness"):
    """Sign and cosine stiffness pooled over within-batch pairs; needs ``Probe.targets``.

    Keys: cosine, cosine_within, cosine_between, cosine_matrix (K, K), and the same for
    sign. ``num_classes=None`` grows K to the largest label seen.
    """

    def __init__(self, num_classes: int | None = None) -> None:
        self.num_classes = num_classes
        self.add_state("_sums", None, _add_sums)  # (3, K, K): cosine, sign, counts

    def update(self, probe: Probe) -> None:
        gram, cos = host_pairs(require_grads(probe, "Stiffness"))  # (B, B) float64
        if probe.targets is None:
            raise ValueError("Stiffness needs labels: pass Probe(targets=y, ...)")
        k = self.num_classes or int(probe.targets.max()) + 1
        if self._sums is not None and not self.num_classes and self._sums.shape[1] > k:
            k = self._sums.shape[1]
        self._sums = _add_sums(_sums(gram, probe.targets, k, cos), self._sums)

    def compute(self) -> dict[str, Any]:
        if self._sums is None:
            raise empty_error("Stiffness")
        return _means(self._sums)
