"""Gradient signal-to-noise ratio (Liu, Chen, Zhang, Ge, Li & Yang, ICLR 2020, "Understanding
why neural networks generalize well through GSNR of parameters").

For parameter coordinate theta_j and per-example gradients g_1(j)..g_N(j):

    mean_j = (1/N) sum_i g_i(j)
    var_j  = (1/N) sum_i (g_i(j) - mean_j)^2        (unbiased=True: divide by N - 1)
    r_j    = mean_j^2 / var_j                        (coordinates with var_j = 0 are skipped)

The instrument keeps per-coordinate count, mean and sum of squared deviations and merges
batches (and chunks within a batch) with Chan et al.'s parallel update, so streaming many
batches equals one big batch up to rounding and there is no E[g^2] - E[g]^2 cancellation.
Per-example values come from ``grads.materialize(chunk_size)`` (chunks of examples; any
name -> (b, *shape) dicts are accepted), so peak memory is chunk_size x P.
Cost per update: B x P multiply-adds; memory 3 P floats.

>>> state = gsnr_state_update(None, {"w": torch.tensor([[1.0], [3.0]])})
>>> gsnr_from_state(state)["mean"]
4.0
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from graddyn.instruments._base import Instrument, Probe, empty_error, require_grads

Tensor = torch.Tensor
State = dict[str, tuple[int, Tensor, Tensor]]  # name -> (count, mean, M2)


def _merge(a: tuple[int, Tensor, Tensor], rows: Tensor) -> tuple[int, Tensor, Tensor]:
    """Chan's update of (n, mean, M2) with the rows (b, *shape) of a chunk."""
    mb = rows.mean(0)
    return _combine(a, (rows.shape[0], mb, (rows - mb).pow(2).sum(0)))


def _combine(a: tuple[int, Tensor, Tensor], b: tuple[int, Tensor, Tensor]
             ) -> tuple[int, Tensor, Tensor]:
    """Chan's parallel combination of two (n, mean, M2) summaries."""
    (n, m, m2), (nb, mb, m2b) = a, b
    if n == 0:
        return nb, mb, m2b
    tot = n + nb
    delta = mb - m
    return tot, m + delta * (nb / tot), m2 + m2b + delta.pow(2) * (n * nb / tot)


def _combine_states(a: State, b: State) -> State:
    """Two GSNR states (e.g. of two data shards) as one."""
    return {k: _combine(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k))
            for k in {**a, **b}}


def gsnr_state_update(state: State | None, chunk: Mapping[str, Tensor]) -> State:
    """Fold a chunk dict name -> (b, *shape) of per-example gradients into the state."""
    state = dict(state or {})
    for name, rows in chunk.items():
        if rows.shape[0] == 0:
            continue
        rows = rows.detach()
        prev = state.get(name, (0, rows.new_zeros(()), rows.new_zeros(())))
        state[name] = _merge(prev, rows)
    return state


def gsnr_per_parameter(state: State, unbiased: bool = False) -> dict[str, Tensor]:
    """name -> per-coordinate GSNR (NaN where the variance is 0)."""
    out = {}
    for name, (n, m, m2) in state.items():
        if n < 2:
            raise ValueError(f"GSNR of {name!r} needs at least 2 examples, got {n}")
        var = m2 / (n - 1 if unbiased else n)
        out[name] = torch.where(var > 0, m.pow(2) / var.clamp_min(torch.finfo(var.dtype).tiny),
                                float("nan"))
    return out


def gsnr_from_state(state: State, unbiased: bool = False) -> dict[str, Any]:
    """Keys: mean (over coordinates with nonzero variance), mean/<name>, num_zero_variance,
    num_examples."""
    per = gsnr_per_parameter(state, unbiased)
    flat = torch.cat([r.reshape(-1) for r in per.values()])
    ok = ~torch.isnan(flat)
    out: dict[str, Any] = {"mean": float(flat[ok].mean()) if ok.any() else float("nan")}
    for name, r in per.items():
        finite = r[~torch.isnan(r)]
        out[f"mean/{name}"] = float(finite.mean()) if finite.numel() else float("nan")
    out["num_zero_variance"] = int((~ok).sum())
    out["num_examples"] = next(iter(state.values()))[0]
    return out


class GSNR(Instrument, name="gsnr"):
    """GSNR streamed over batches (see module). ``per_parameter()`` gives the full tensors."""

    def __init__(self, chunk_size: int | None = 32, unbiased: bool = False) -> None:
        self.chunk_size, self.unbiased = chunk_size, unbiased
        self.add_state("_state", {}, _combine_states)  # name -> (count, mean, M2)

    def update(self, probe: Probe) -> None:
        grads = require_grads(probe, "GSNR")
        chunks = grads.materialize(chunk_size=self.chunk_size)
        for chunk in [chunks] if isinstance(chunks, Mapping) else chunks:
            self._state = gsnr_state_update(self._state, chunk)

    def per_parameter(self) -> dict[str, Tensor]:
        if not self._state:
            raise empty_error("GSNR")
        return gsnr_per_parameter(self._state, self.unbiased)

    def compute(self) -> dict[str, Any]:
        if not self._state:
            raise empty_error("GSNR")
        return gsnr_from_state(self._state, self.unbiased)
