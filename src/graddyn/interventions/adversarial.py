"""Worst-case perturbations, projected gradient descent (PGD) attacks and adversarial training.

For a linear classifier ``f(x) = <w, x>`` and a decreasing margin loss ``l(y f(x))`` the
perturbation of norm ``<= eps`` that maximises the loss has a closed form (Li et al., ICLR 2020):

    l2:     x' = x - eps * y * w / |w|_2        margin  y<w,x> - eps |w|_2
    l-inf:  x' = x - eps * y * sign(w)          margin  y<w,x> - eps |w|_1

with ``y`` in {-1, +1}. For other models, PGD (Madry et al., ICLR 2018) ascends the loss::

    delta <- Proj_{|delta| <= eps}(delta + alpha * g / |g|_2)     (l2)
    delta <- clip(delta + alpha * sign(g), -eps, eps)            (l-inf),   g = d loss / d delta

Adversarial training (``adversarial_gd_linear``) is full-batch GD on the loss at the worst-case
points (Danskin's theorem: the perturbation is held fixed when differentiating).

>>> w = torch.tensor([3.0, -4.0]); x = torch.tensor([[1.0, 1.0]]); y = torch.tensor([1])
>>> worst_case_linear(w, x, y, eps=0.5, norm="l2")
tensor([[0.7000, 1.4000]])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddyn.instruments.margin import signed_labels

__all__ = [
    "LOSSES",
    "PGDResult",
    "adversarial_gd_linear",
    "margin_loss",
    "misclassified",
    "pgd",
    "project",
    "random_start",
    "worst_case_linear",
]

Norm = Literal["l2", "linf"]
LOSSES = ("logistic", "exponential")


def _check(eps: float, norm: str) -> None:
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")


def margin_loss(margins: Tensor, loss: str = "logistic") -> Tensor:
    """Per-example ``log(1 + exp(-q))`` (logistic) or ``exp(-q)`` (exponential) of margins q."""
    if loss == "logistic":
        return F.softplus(-margins)
    if loss == "exponential":
        return torch.exp(-margins)
    raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")


def worst_case_linear(w: Tensor, x: Tensor, y: Tensor, eps: float, norm: Norm = "l2") -> Tensor:
    """The loss-maximising points ``x'`` within ``eps`` of ``x`` for the linear model ``w``.

    Shapes: w (d,), x (n, d), y (n,) in {0,1} or {-1,1} -> (n, d). Exact for any decreasing
    margin loss. ``w = 0`` leaves l2 points unchanged (every direction is worst).
    """
    _check(eps, norm)
    ys = signed_labels(y).to(x.dtype)[:, None]
    if norm == "l2":
        direction = w / w.norm() if w.norm() > 0 else torch.zeros_like(w)
    else:
        direction = torch.sign(w)
    return x - eps * ys * direction


def project(delta: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project each example's perturbation (first axis = batch) onto the ``eps``-ball."""
    _check(eps, norm)
    if norm == "linf":
        return delta.clamp(-eps, eps)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
    scale = (eps / norms).clamp(max=1.0)
    return delta * scale.view(-1, *([1] * (delta.ndim - 1)))


def random_start(shape: Sequence[int], eps: float, norm: Norm,
                 generator: torch.Generator | None = None) -> Tensor:
    """Uniform random point of the ``eps``-ball (l2: uniform in the ball; l-inf: in the cube)."""
    _check(eps, norm)
    if norm == "linf":
        return eps * (2 * torch.rand(*shape, generator=generator) - 1)
    g = torch.randn(*shape, generator=generator)
    g = g / g.flatten(1).norm(dim=1).view(-1, *([1] * (len(shape) - 1)))
    dim = int(torch.tensor(shape[1:]).prod())
    radius = eps * torch.rand(shape[0], generator=generator) ** (1.0 / dim)
    return g * radius.view(-1, *([1] * (len(shape) - 1)))


def misclassified(outputs: Tensor, y: Tensor) -> Tensor:
    """(B,) bool: wrong sign for scores (B,)/(B, 1), wrong argmax for logits (B, K)."""
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        return signed_labels(y).to(outputs.dtype) * outputs.reshape(-1) <= 0
    return outputs.argmax(dim=1) != y


def _default_loss(outputs: Tensor, y: Tensor) -> Tensor:
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        return F.softplus(-signed_labels(y).to(outputs.dtype) * outputs.reshape(-1))
    return F.cross_entropy(outputs, y, reduction="none")


@dataclass
class PGDResult:
    """delta: final perturbation (B, ...); first_success: (B,) number of gradient steps after
    which the attack first succeeded (0 = the start already did), -1 = never."""

    delta: Tensor
    first_success: Tensor


def pgd(
    model: nn.Module | Callable[[Tensor], Tensor],
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Norm = "linf",
    steps: int = 10,
    step_size: float | None = None,
    delta0: Tensor | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = _default_loss,
    success_fn: Callable[[Tensor, Tensor], Tensor] = misclassified,
) -> PGDResult:
    """PGD ascent on ``loss_fn(model(x + delta), y)`` (per example, (B,)) from ``delta0``
    (default zero; pass :func:`random_start` or a learned start), projected on the ball.

    ``step_size`` defaults to ``2.5 eps / steps``. Cost: ``steps`` forward+backward passes.
    The model's parameters get no gradient.
    """
    _check(eps, norm)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    alpha = step_size if step_size is not None else 2.5 * eps / max(steps, 1)
    delta = project(delta0.clone() if delta0 is not None else torch.zeros_like(x), eps, norm)
    first = torch.full((x.shape[0],), -1, dtype=torch.long)
    for it in range(steps + 1):
        delta.requires_grad_(True)
        out = model(x + delta)
        with torch.no_grad():
            first[(first < 0) & success_fn(out, y)] = it
        if it == steps:
            break
        (grad,) = torch.autograd.grad(loss_fn(out, y).sum(), delta)
        with torch.no_grad():
            if norm == "linf":
                step = grad.sign()
            else:
                gn = grad.flatten(1).norm(dim=1).clamp_min(1e-30)
                step = grad / gn.view(-1, *([1] * (grad.ndim - 1)))
            delta = project(delta + alpha * step, eps, norm)
    return PGDResult(delta.detach(), first)


def adversarial_gd_linear(
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: Norm = "l2",
    steps: int = 1000,
    lr: float = 1.0,
    loss: str = "logistic",
    record_at: Sequence[int] = (),
    w0: Tensor | None = None,
    step_rule: str = "constant",
) -> list[tuple[int, Tensor]]:
    """Full-batch GD on ``mean_i l(y_i <w, x'_i>)`` with ``x'`` the exact worst case
    (``eps = 0``: clean GD); ``step_rule="normalized"`` divides ``lr`` by the current loss
    (normalised GD, Nacson et al., AISTATS 2019). Gradients in closed form. Returns
    ``[(t, w_t)]`` for ``t`` in ``record_at`` (steps done).

    >>> x = torch.tensor([[1.0, 0.2], [-1.0, 0.1]]); y = torch.tensor([1, 0])
    >>> adversarial_gd_linear(x, y, 0.1, steps=5, record_at=[5])[0][1].shape
    torch.Size([2])
    """
    _check(eps, norm)
    if step_rule not in ("constant", "normalized"):
        raise ValueError(f"step_rule must be 'constant' or 'normalized', got {step_rule!r}")
    margin_loss(torch.zeros(1), loss)  # validate the loss name
    # numpy float64: for small problems torch's per-op overhead would dominate each step
    z = (signed_labels(y)[:, None] * x).double().cpu().numpy()  # (n, d)
    w = np.zeros(z.shape[1]) if w0 is None else w0.double().cpu().numpy().copy()
    wanted, out = set(record_at), []
    for t in range(steps + 1):
        if t in wanted:
            out.append((t, torch.as_tensor(w.copy(), dtype=x.dtype)))
        if t == steps:
            break
        log_scale, value, grad = _scaled_loss_and_grad(w, z, eps, norm, loss)
        # true loss = value * exp(log_scale), true gradient = grad * exp(log_scale)
        w = w - lr * grad * (1.0 / value if step_rule == "normalized" else np.exp(log_scale))
    return out


def _scaled_loss_and_grad(w: np.ndarray, z: np.ndarray, eps: float, norm: Norm, loss: str
                          ) -> tuple[float, float, np.ndarray]:
    """Mean loss at the worst-case points and its gradient (Danskin), both divided by
    ``exp(-q_min)`` so that they never underflow: ``q_i = <w, z_i> - eps |w|_*`` and
    ``grad = mean_i l'(q_i) (z_i - eps d|w|_*)``. Returns ``(-q_min, value, grad)``."""
    if norm == "l2":
        wn = float(np.linalg.norm(w))
        dual, sub = wn, (w / wn if wn > 0 else np.zeros_like(w))
    else:
        dual, sub = float(np.abs(w).sum()), np.sign(w)
    q = z @ w - eps * dual
    qmin = float(q.min())
    s = np.exp(qmin - q)  # in (0, 1]
    if loss == "exponential":
        values, slope = s, -s
    else:  # logistic: softplus(-q) = e^{-q} log1p(u)/u and sigmoid(-q) = e^{-q}/(1+u), u = e^{-q}
        u = np.exp(np.minimum(-q, 700.0))
        ratio = np.where(u > 1e-12, np.log1p(u) / np.maximum(u, 1e-300), 1.0 - u / 2)
        values, slope = s * ratio, -s / (1.0 + u)
    grad = (slope[:, None] * (z - eps * sub)).mean(axis=0)
    return -qmin, float(values.mean()), grad
