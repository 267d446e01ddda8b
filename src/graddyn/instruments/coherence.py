"""Coherence of per-example gradients: alpha and m-coherence (Chatterjee & Zielinski 2020).

For per-example gradients g_1..g_N (at one fixed model) with S = sum_i g_i and
Q = sum_i |g_i|^2:

    m_coherence = |S|^2 / Q                                        in [0, N]
    alpha       = sum_{i != j} g_i . g_j / ((N - 1) Q) = (|S|^2 - Q) / ((N - 1) Q)
    alpha_plugin = |S / N|^2 / (Q / N) = m_coherence / N

``alpha`` estimates the paper's alpha = E[g_z . g_z'] / E[|g_z|^2] over *independent* draws
z, z', so the numerator is a U-statistic over distinct pairs (i != j; the diagonal i = j
would add the denominator's own terms). ``alpha_plugin`` is the V-statistic that keeps
i = j (draws with replacement from the sample). m_coherence = 1 + (N - 1) alpha: 1 for
orthogonal gradients, N for identical ones, ~0 when they cancel.

Streaming: across batches the pairs (i, j) range over *all* N examples seen, not only pairs
within a batch, so the instrument accumulates the running gradient sum S (P numbers, from
``grads.sum()``) and Q (from ``grads.norms()``); nothing per-example is stored, and the result
equals one big batch of all N examples exactly. Batches must come from the same model (no
optimizer step in between). ``m_coherence_within`` is the mean over batches of each batch's
own m-coherence (from its Gram, no cross-batch pairs).

Cost per update: one ``sum()`` and ``norms()`` (+ the Gram for ``m_coherence_within``);
memory P floats.

>>> g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
>>> coherence_from_sums(g.sum(0).pow(2).sum(), g.pow(2).sum(), 3)["m_coherence"]
1.6666666666666667
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from graddyn._gram import host_pairs
from graddyn.instruments._base import Instrument, Probe, empty_error, require_grads

Tensor = torch.Tensor


def coherence_from_sums(sum_sq: Tensor | float, q: Tensor | float, n: int) -> dict[str, float]:
    """alpha, alpha_plugin and m_coherence from |S|^2, Q = sum |g_i|^2 and N (see module)."""
    sum_sq, q = float(sum_sq), float(q)
    if n < 2 or q <= 0.0:
        raise ValueError(f"coherence needs N >= 2 examples with a nonzero gradient (N={n}, Q={q})")
    m = sum_sq / q
    return {"alpha": (m - 1.0) / (n - 1), "alpha_plugin": m / n, "m_coherence": m}


def coherence_from_gram(gram: Tensor) -> dict[str, float]:
    """The same statistics for one batch from its (B, B) Gram matrix: |S|^2 = 1^T G 1."""
    return coherence_from_sums(gram.sum(), gram.diagonal().sum(), gram.shape[0])


class Coherence(Instrument, name="coherence"):
    """Streams alpha / m-coherence over batches of one model (keys: alpha, alpha_plugin,
    m_coherence, m_coherence_within, num_examples)."""

    def __init__(self, within: bool = True) -> None:
        self.within = within
        self.add_state("_sum", {}, "sum")  # name -> running sum S of the gradients, param shape
        self.add_state("_q", 0.0, "sum")  # Q = sum_i |g_i|^2
        self.add_state("_n", 0, "sum")  # examples seen
        self.add_state("_within", [], "cat")  # each batch's own m-coherence

    def update(self, probe: Probe) -> None:
        grads = require_grads(probe, "Coherence")
        for name, s in grads.sum().items():
            s = s.detach()
            self._sum[name] = self._sum[name] + s if name in self._sum else s.clone()
        norms = grads.norms().detach()
        self._q += float(norms.pow(2).sum())
        self._n += norms.shape[0]
        if self.within and norms.shape[0] >= 2:
            self._within.append(coherence_from_gram(grads.gram())["m_coherence"])

    def compute(self) -> dict[str, Any]:
        if self._n == 0:
            raise empty_error("Coherence")
        sum_sq = sum(float(s.pow(2).sum()) for s in self._sum.values())
        out: dict[str, Any] = dict(coherence_from_sums(sum_sq, self._q, self._n))
        if self._within:
            out["m_coherence_within"] = sum(self._within) / len(self._within)
        out["num_examples"] = self._n
        return out


class BatchCoherence(Instrument, name="batch_coherence"):
    """alpha and m-coherence of each batch from its Gram alone (``coherence_from_gram``:
    |S|^2 = 1^T G 1), O(B^2): the cheap form for measuring the training minibatch every step,
    where ``Coherence`` pools pairs *across* batches and so also sums P-sized gradients.
    Over several updates (e.g. probe chunks) the per-batch values are averaged. Keys: alpha,
    alpha_plugin, m_coherence, num_batches."""

    def __init__(self) -> None:
        self.add_state("_values", [], "cat")  # per batch: {alpha, alpha_plugin, m_coherence}

    def update(self, probe: Probe) -> None:
        gram, _ = host_pairs(require_grads(probe, "BatchCoherence"))  # (B, B) float64
        self._values.append(coherence_from_sums(gram.sum(), np.trace(gram), gram.shape[0]))

    def compute(self) -> dict[str, Any]:
        if not self._values:
            raise empty_error("BatchCoherence")
        keys = self._values[0]
        out: dict[str, Any] = {k: sum(v[k] for v in self._values) / len(self._values)
                               for k in keys}
        out["num_batches"] = len(self._values)
        return out
