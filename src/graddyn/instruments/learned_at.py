"""Learned-at step: the first step from which a training example is classified correctly and
stays so (Chatterjee, "Coherent Gradients", ICLR 2020: pristine examples are learned before
corrupt ones).

For example n observed at steps t_1 < ... < t_T with correctness c_n(t):

    learned_at(n) = min { t_k : c_n(t_l) for every l >= k }     (-1 if wrong at the last one)

"Stays so" is judged on the observations so far: the instrument keeps, per training index,
the start of the current run of correct classifications. Needs ``Probe.outputs`` (B, K),
``targets`` and ``indices`` (positions in the training set); a ``corrupt`` (N,) mask over
the training set splits the fractions. No gradients. Memory: two ints and a bool per
training example seen.

>>> learned_at_steps(torch.tensor([[0, 1, 1], [1, 0, 1]]).bool(), torch.tensor([0, 5, 9]))
tensor([5, 9])
"""

from __future__ import annotations

from typing import Any

import torch

from graddyn.instruments._base import Instrument, Probe, empty_error

Tensor = torch.Tensor


def learned_at_steps(correct: Tensor, steps: Tensor) -> Tensor:
    """From a (N, T) correctness history at ``steps`` (T,), the learned-at step per example."""
    out = torch.full((correct.shape[0],), -1, dtype=torch.long)
    alive = torch.ones(correct.shape[0], dtype=torch.bool)  # correct at every later step
    for k in range(correct.shape[1] - 1, -1, -1):
        alive &= correct[:, k].bool()
        out = torch.where(alive, steps[k].long(), out)
    return out


class LearnedAt(Instrument, name="learned_at"):
    """Tracks learned-at steps by training index.

    Keys: frac_learned, frac_learned_pristine, frac_learned_corrupt (over examples seen),
    mean_step_pristine, mean_step_corrupt (over learned ones; NaN if none), num_seen.

    ``run_long=True`` keeps the record across probes of a training run (``accumulates``: the
    trainer then never resets it, and checkpoints it through ``state_dict``), so the steps are
    true learned-at steps; the default starts afresh at every probe.
    """

    needs_grads = False

    def __init__(self, run_long: bool = False, corrupt: torch.Tensor | None = None) -> None:
        self.accumulates = run_long
        self.corrupt = None if corrupt is None else corrupt.bool().cpu()  # (N,)
        # per training index: start of the current run of correct answers; -1: wrong now,
        # -2: never seen. Indices are not shards' disjoint ranges: no reduction.
        self.add_state("_start", torch.empty(0, dtype=torch.long))

    def _grow(self, size: int) -> None:
        if size > self._start.shape[0]:
            extra = size - self._start.shape[0]
            self._start = torch.cat([self._start, torch.full((extra,), -2, dtype=torch.long)])

    def update(self, probe: Probe) -> None:
        if probe.outputs is None or probe.targets is None or probe.indices is None:
            raise ValueError("LearnedAt needs Probe(outputs=logits, targets=y, indices=idx)")
        idx = probe.indices.long().cpu()
        if self.corrupt is not None and int(idx.max()) >= len(self.corrupt):
            raise IndexError(f"LearnedAt: probe index {int(idx.max())} is outside the corrupt "
                             f"mask of {len(self.corrupt)} training examples")
        self._grow(int(idx.max()) + 1)
        correct = (probe.outputs.argmax(-1) == probe.targets).cpu()
        prev = self._start[idx]
        started = torch.where(prev >= 0, prev, torch.full_like(prev, probe.step))
        self._start[idx] = torch.where(correct, started, torch.full_like(prev, -1))

    def learned_at(self) -> dict[int, int]:
        """training index -> learned-at step (-1 when currently misclassified)."""
        seen = (self._start > -2).nonzero().flatten()
        return {int(i): int(self._start[i]) for i in seen}

    def compute(self) -> dict[str, Any]:
        seen = self._start > -2
        if not seen.any():
            raise empty_error("LearnedAt")
        learned = self._start >= 0
        corrupt = torch.zeros_like(seen)  # (N_seen,) the group of every index seen
        if self.corrupt is not None:
            k = min(len(seen), len(self.corrupt))
            corrupt[:k] = self.corrupt[:k]
        out: dict[str, Any] = {"frac_learned": float(learned[seen].float().mean())}
        for name, grp in (("pristine", seen & ~corrupt), ("corrupt", seen & corrupt)):
            n = int(grp.sum())
            out[f"frac_learned_{name}"] = float(learned[grp].sum()) / n if n else float("nan")
            steps = self._start[grp & learned].double()
            out[f"mean_step_{name}"] = float(steps.mean()) if steps.numel() else float("nan")
        out["num_seen"] = int(seen.sum())
        return out
