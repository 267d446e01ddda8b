"""Split of the first-order loss reduction between two groups of a batch (Chatterjee,
"Coherent Gradients", ICLR 2020, label-noise experiments: pristine vs corrupt examples).

For a batch of B examples with per-example gradients g_i, mask m (True = corrupt),
g = (1/B) sum_i g_i, g_c = (1/B) sum_{i corrupt} g_i and g_p = g - g_c. An SGD step of size
lr lowers the batch loss by lr <g, g> to first order, of which example i contributes
lr <g, g_i> / B. With the Gram G (G_ij = <g_i, g_j>) and s_i = sum_j G_ij:

    <g, g>   = 1^T G 1 / B^2        <g, g_c> = m^T G 1 / B^2 = sum_{i corrupt} s_i / B^2
    f_c = <g, g_c> / <g, g>,   f_p = <g, g_p> / <g, g> = 1 - f_c
    contribution of example i: <g, g_i> / B = s_i / B^2
    mean_p, mean_c = mean contribution over pristine / corrupt examples

Pooled over updates since ``reset`` (the trainer updating once per step gives the paper's
cumulative curves): f_c = sum_t <g_t, g_c,t> / sum_t <g_t, g_t> and mean_c = (sum of corrupt
contributions) / (number of corrupt examples); ``last_*`` keys are the latest update alone.
"Null worlds" (the paper's significance check): the same statistics with the group mask
randomly permuted within the batch (k worlds, seeded by (seed, step, world), so reruns and
resumes agree). Cost: one Gram per update; nothing of size P.

>>> gram = torch.eye(4)
>>> split_from_gram(gram, torch.tensor([False, False, False, True]))["f_c"]
0.25
"""

from __future__ import annotations

from typing import Any

import torch

from graddyn.instruments._base import Instrument, Probe, empty_error, require_grads

Tensor = torch.Tensor
_FIELDS = ("total", "sum_c", "n_c", "n_p")  # <g,g>, sum of corrupt contributions, counts


def split_sums(gram: Tensor, mask: Tensor) -> dict[str, float]:
    """<g, g>, sum of corrupt contributions <g, g_c>, and group sizes from one batch."""
    b = gram.shape[0]
    if mask.shape != (b,):
        raise ValueError(f"groups must be a ({b},) bool mask, got shape {tuple(mask.shape)}")
    contrib = gram.sum(1) / b**2  # (B,) <g, g_i> / B
    n_c = int(mask.sum())
    return {"total": float(contrib.sum()), "sum_c": float(contrib[mask.bool()].sum()),
            "n_c": n_c, "n_p": b - n_c}


def split_from_sums(s: dict[str, float]) -> dict[str, float]:
    """f_p, f_c, mean_p, mean_c from (pooled) sums; NaN for an empty group or zero gradient."""
    nan = float("nan")
    sum_p = s["total"] - s["sum_c"]
    f_c = s["sum_c"] / s["total"] if s["total"] != 0 else nan
    return {"f_p": 1.0 - f_c, "f_c": f_c,
            "mean_p": sum_p / s["n_p"] if s["n_p"] else nan,
            "mean_c": s["sum_c"] / s["n_c"] if s["n_c"] else nan}


def split_from_gram(gram: Tensor, mask: Tensor) -> dict[str, float]:
    """The split statistics of one batch (see module)."""
    return split_from_sums(split_sums(gram, mask))


def null_masks(mask: Tensor, k: int, seed: int, step: int) -> list[Tensor]:
    """k random permutations of ``mask``, world w seeded by (seed, step, w)."""
    out = []
    for w in range(k):
        gen = torch.Generator().manual_seed(hash((seed, step, w)) & 0x7FFF_FFFF_FFFF)
        out.append(mask[torch.randperm(mask.shape[0], generator=gen).to(mask.device)])
    return out


def _later(mine: dict[str, float] | None, other: dict[str, float] | None
           ) -> dict[str, float] | None:
    """Of two shards' latest sums, the second's (shards merge in order)."""
    return mine if other is None else other


class GroupSplit(Instrument, name="group_split"):
    """Loss-reduction split between pristine and corrupt examples. ``corrupt``: (N,) bool
    mask over the training set, read at ``Probe.indices`` (the probe's rows).

    Keys: f_p, f_c, mean_p, mean_c (pooled since reset), last_f_p, last_f_c, last_mean_p,
    last_mean_c, and null{w}/f_p, null{w}/f_c, null{w}/mean_p, null{w}/mean_c for each world.

    ``cumulative=True`` pools over every step of a training run (the paper's cumulative f_p,
    f_c and per-example means; ``accumulates``): the trainer then never resets it and
    checkpoints it through ``state_dict``; the default pools only within one probe.
    """

    def __init__(self, corrupt: torch.Tensor, null_worlds: int = 3, seed: int = 0,
                 cumulative: bool = False) -> None:
        if null_worlds < 0:
            raise ValueError(f"null_worlds must be >= 0, got {null_worlds}")
        self.corrupt, self.null_worlds, self.seed = corrupt.bool(), null_worlds, seed
        self.accumulates = cumulative
        # (1 + null_worlds, 4) float64: per world [real, null 0, ...] the sums of _FIELDS
        self.add_state("_pooled", torch.zeros(1 + null_worlds, len(_FIELDS),
                                              dtype=torch.float64), "sum")
        self.add_state("_last", None, _later)  # the latest update's sums (a dict of _FIELDS)

    def update(self, probe: Probe) -> None:
        gram = require_grads(probe, "GroupSplit").gram().detach()
        if probe.indices is None:
            raise ValueError("GroupSplit reads its group mask at the probe's rows: pass "
                             "Probe(indices=...)")
        mask = self.corrupt[probe.indices.to(self.corrupt.device)].to(gram.device)  # (B,)
        masks = [mask] + null_masks(mask, self.null_worlds, self.seed, probe.step)
        sums = [split_sums(gram, m) for m in masks]  # per world [real, null 0, ...]
        self._pooled += torch.tensor([[float(s[f]) for f in _FIELDS] for s in sums],
                                     dtype=torch.float64)
        self._last = sums[0]

    def compute(self) -> dict[str, Any]:
        if self._last is None:
            raise empty_error("GroupSplit")
        pooled = [dict(zip(_FIELDS, row)) for row in self._pooled.tolist()]
        out: dict[str, Any] = dict(split_from_sums(pooled[0]))
        out.update({f"last_{k}": v for k, v in split_from_sums(self._last).items()})
        for w, sums in enumerate(pooled[1:]):
            out.update({f"null{w}/{k}": v for k, v in split_from_sums(sums).items()})
        return out
