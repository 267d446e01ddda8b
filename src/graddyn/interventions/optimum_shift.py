"""Optimum shifting (OS) and stochastic OS: the minimum-norm last layer with the same outputs.

A trained network's last linear layer ``y = A V^T + b`` (features ``A (n, in)``, weight
``V (out, in)``) can be replaced by any ``V*`` with ``A V*^T = A V^T``: the outputs, hence the
loss, on that batch do not change. OS picks the one with minimum Frobenius norm,

    V*^T = A^+ A V^T,   i.e.  V* = V P,  P = A^+ A = R R^T  (projection onto row space of A),

with ``R (in, r)`` the right singular vectors of ``A`` whose singular values exceed
``tol = rtol * s_max`` (rank-revealing SVD, computed in float64). Since ``P`` is an orthogonal
projection, ``|V*|_F <= |V|_F``, and the Hessian trace of the loss w.r.t. the features is bounded
by ``|V|_F^2`` times a data term, so OS moves to a flatter point with the same training loss.
Stochastic OS applies this every ``k`` steps on a small batch (relying on neural collapse to
keep the other batches' outputs nearly unchanged).

Reference: "Optimum Shifting to Stabilize Training and Improve Generalization of Deep Neural
Networks" (OS / stochastic OS).

Bias: ``bias="fixed"`` (default) keeps ``b`` and projects ``V`` alone (``|V|_F`` never grows);
``bias="augment"`` solves the augmented system ``[A, 1] [V, b]^T`` so the minimum is over
``|[V, b]|_F`` (then ``|[V, b]|_F`` never grows, but ``|V|_F`` alone may). Either way the
outputs on the batch are unchanged up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

_BIAS_MODES = ("fixed", "augment")


@dataclass(frozen=True)
class OptimumShiftReport:
    """What one optimum shift did.

    max_abs_change: ``max |y* - y|`` over the batch's outputs.
    max_rel_change: ``max_abs_change / max |y|``.
    weight_norm_before / weight_norm_after: ``|V|_F`` before and after.
    rank: rank of ``A`` (or ``[A, 1]``) used.  tol: singular-value cut-off used.
    num_rows: ``n``, the number of feature rows.  bias: the bias mode.
    """

    max_abs_change: float
    max_rel_change: float
    weight_norm_before: float
    weight_norm_after: float
    rank: int
    tol: float
    num_rows: int
    bias: str


def _row_space(A: Tensor, rtol: float | None, eps: float) -> tuple[Tensor, float]:
    """Orthonormal basis ``(in, r)`` of the row space of ``A (n, in)`` and the tolerance used."""
    _, S, Vh = torch.linalg.svd(A, full_matrices=False)
    if rtol is None:  # NumPy's matrix_rank default, at the precision the features came in
        rtol = max(A.shape) * eps
    tol = rtol * (S[0].item() if S.numel() else 0.0)
    r = int((S > tol).sum())
    return Vh[:r].T, tol


def _check(layer: nn.Module, features: Tensor, bias: str) -> None:
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"optimum_shift needs an nn.Linear layer, got {type(layer).__name__}; "
                        "pass the model's last linear layer (e.g. model.fc)")
    if features.ndim != 2 or features.shape[1] != layer.in_features:
        raise ValueError(f"features must have shape (n, {layer.in_features}) (the inputs of the "
                         f"layer), got {tuple(features.shape)}; collect them with "
                         "collect_features(model, layer, batches)")
    if bias not in _BIAS_MODES:
        raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")


@torch.no_grad()
def optimum_shift(layer: nn.Linear, features: Tensor, *, rtol: float | None = None,
                  bias: str = "fixed") -> OptimumShiftReport:
    """Replace ``layer.weight`` (and with ``bias="augment"`` the bias) in place by the
    minimum-norm solution keeping ``layer(features)`` unchanged; see the module docstring.

    Args:
        layer: the ``nn.Linear`` to shift.
        features: ``A (n, in)``, its inputs on a batch (from :func:`collect_features`).
        rtol: singular values below ``rtol * s_max`` count as zero
            (default ``max(n, in) * eps`` of the features' dtype).
        bias: ``"fixed"`` or ``"augment"``.

    Cost: one SVD of ``A`` in float64, ``O(n * in * min(n, in))``.

    Example:
        >>> fc = nn.Linear(8, 3)
        >>> report = optimum_shift(fc, torch.randn(4, 8))   # rank 4 < 8: |V|_F shrinks
        >>> report.rank, report.weight_norm_after < report.weight_norm_before
        (4, True)
    """
    _check(layer, features, bias)
    A = features.detach().to(torch.float64)
    W = layer.weight.detach().to(torch.float64)  # (out, in)
    b = layer.bias.detach().to(torch.float64) if layer.bias is not None else None
    if bias == "augment" and b is not None:
        A = torch.cat([A, torch.ones(len(A), 1, dtype=A.dtype, device=A.device)], 1)
        W = torch.cat([W, b[:, None]], 1)
    before = A @ W.T + (b if bias == "fixed" and b is not None else 0)
    R, tol = _row_space(A, rtol, torch.finfo(features.dtype).eps)
    W_new = (W @ R) @ R.T  # V P, P = R R^T
    after = A @ W_new.T + (b if bias == "fixed" and b is not None else 0)
    if W_new.shape[1] > layer.in_features:  # augmented: split [V*, b*]
        layer.bias.copy_(W_new[:, -1])
        W_new = W_new[:, :-1]
    norm_before = layer.weight.detach().to(torch.float64).norm().item()
    layer.weight.copy_(W_new)
    change = (after - before).abs().max().item() if len(A) else 0.0
    scale = before.abs().max().item() if len(A) else 0.0
    return OptimumShiftReport(change, change / scale if scale > 0 else 0.0, norm_before,
                              W_new.norm().item(), R.shape[1], tol, len(A), bias)


@torch.no_grad()
def collect_features(model: nn.Module, layer: nn.Module, batches: Iterable[Any] | Tensor, *,
                     eval_mode: bool = True) -> Tensor:
    """The inputs of ``layer`` on one or many batches, stacked to ``(n, in)``.

    A forward hook captures ``layer``'s input while ``model`` runs on each batch (an inputs
    tensor, or a tuple/list whose first item is the inputs); leading dims are flattened.
    ``eval_mode`` runs the model in eval mode (BatchNorm uses running statistics, no dropout)
    and restores the previous modes afterwards.
    """
    if isinstance(batches, Tensor):
        batches = [batches]
    feats: list[Tensor] = []
    handle = layer.register_forward_hook(lambda m, inp, out: feats.append(inp[0].detach()))
    modes = {m: m.training for m in model.modules()}
    if eval_mode:
        model.eval()
    try:
        for batch in batches:
            model(batch[0] if isinstance(batch, (tuple, list)) else batch)
    finally:
        handle.remove()
        for m, mode in modes.items():
            m.training = mode
    if not feats:
        raise ValueError("no features captured: batches was empty or the model never called "
                         "the layer; pass a non-empty batch and a layer used in forward")
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])


def _event_name(event: Any) -> str:
    return str(getattr(event, "name", event)).lower()


class StochasticOptimumShift:
    """Stochastic OS as a training intervention: every ``every`` steps, draw a batch of
    ``batch_size`` examples, collect the last layer's features on it and shift the layer.

    Composer-style, for ``graddyn.train.Trainer(interventions=[...])``: the trainer calls
    ``match(event, state)`` and, when True, ``apply(event, state)`` (default event
    ``AFTER_STEP``, i.e. right after the optimizer step). ``state`` needs ``model`` and ``step``
    (``graddyn.train.State``). The batch comes from, in this order:

    - ``sample(state, batch_size)`` if given (inputs, or an ``(inputs, targets)`` tuple);
    - ``data``: a tensor of training inputs ``(N, *input_shape)`` (e.g. ``splits.train_x``),
      from which ``batch_size`` rows are drawn without replacement by the intervention's own
      generator (seeded by ``seed``; its state is in ``state_dict`` so a resumed run draws the
      same batches);
    - ``state.sample_batch(batch_size)`` if the state has one (a user's own loop);
    - otherwise the first ``batch_size`` examples of the current minibatch ``state.batch.x``
      (the trainer's order is already random), which must be at least that large.

    ``layer`` picks the layer: a module name in ``model.named_modules()``, the module itself,
    or a callable ``model -> nn.Linear`` (e.g. ``lambda m: graddyn.models.last_linear(m)[1]``).
    Reports are kept in ``self.reports`` as ``(step, OptimumShiftReport)``.
    Cost per shift: one forward pass on ``batch_size`` examples and an SVD of ``(n, in)``.

    Example:
        >>> sos = StochasticOptimumShift("fc", every=10, batch_size=32, data=torch.randn(64, 784))
        >>> Trainer(model, opt, splits, interventions=[sos]).fit(500)  # doctest: +SKIP
    """

    def __init__(self, layer: str | nn.Linear | Callable[[nn.Module], nn.Linear], every: int,
                 batch_size: int, *, event: str = "after_step",
                 sample: Callable[[Any, int], Any] | None = None, data: Tensor | None = None,
                 seed: int = 0, rtol: float | None = None, bias: str = "fixed") -> None:
        if every < 1 or batch_size < 1:
            raise ValueError(f"every and batch_size must be >= 1, got {every}, {batch_size}")
        if bias not in _BIAS_MODES:
            raise ValueError(f"bias must be one of {_BIAS_MODES}, got {bias!r}")
        if data is not None and len(data) < batch_size:
            raise ValueError(f"data has {len(data)} rows, fewer than batch_size={batch_size}; "
                             "lower batch_size or pass more data")
        self.layer, self.every, self.batch_size = layer, every, batch_size
        self.event, self.sample, self.rtol, self.bias = event.lower(), sample, rtol, bias
        self.data = data
        self.generator = torch.Generator().manual_seed(seed)
        self.reports: list[tuple[int, OptimumShiftReport]] = []

    def match(self, event: Any, state: Any) -> bool:
        return _event_name(event) == self.event and state.step > 0 and state.step % self.every == 0

    def apply(self, event: Any, state: Any) -> OptimumShiftReport:
        layer = self._resolve(state.model)
        batch = self._draw(state)
        feats = collect_features(state.model, layer, [batch])
        report = optimum_shift(layer, feats, rtol=self.rtol, bias=self.bias)
        self.reports.append((state.step, report))
        return report

    def state_dict(self) -> dict[str, Any]:
        """The sampling generator's state (what a resumed run needs to draw the same batches)."""
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def _resolve(self, model: nn.Module) -> nn.Linear:
        if isinstance(self.layer, nn.Module):
            return self.layer  # type: ignore[return-value]
        if callable(self.layer):
            return self.layer(model)
        modules = dict(model.named_modules())
        if self.layer not in modules:
            raise ValueError(f"no module named {self.layer!r}; pass a name from "
                             f"model.named_modules(): {[n for n in modules if n]}")
        return modules[self.layer]  # type: ignore[return-value]

    def _draw(self, state: Any) -> Any:
        if self.sample is not None:
            return self.sample(state, self.batch_size)
        if self.data is not None:
            idx = torch.randperm(len(self.data), generator=self.generator)[: self.batch_size]
            return self.data[idx]
        if hasattr(state, "sample_batch"):  # a state that knows how to sample (user loops)
            return state.sample_batch(self.batch_size)
        batch = getattr(state, "batch", None)
        if batch is None or len(batch.x) < self.batch_size:
            have = "no minibatch" if batch is None else f"a minibatch of {len(batch.x)}"
            raise ValueError(f"state has {have}, need {self.batch_size} examples; pass "
                             "data=train_x or sample=lambda state, n: ... to "
                             "StochasticOptimumShift")
        return batch.x[: self.batch_size]
