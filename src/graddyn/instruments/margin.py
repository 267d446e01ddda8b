"""Margins of classifiers on separable data and the max-margin direction they converge to.

Gradient descent on separable data converges in direction to a maximum-margin classifier
(Soudry et al., JMLR 2018); adversarial training with l2-bounded perturbations converges to the
same l2 max-margin direction, and with l-infinity perturbations of radius ``eps`` to the
*maximum mixed-norm margin* direction (Li et al., ICLR 2020)::

    u*(eps) = argmax_{|u|_2 = 1}  min_i y_i <u, x_i> - eps |u|_1           (l-inf attack)

(``eps = 0`` or an l2 attack gives the usual l2 max-margin direction). We solve the equivalent
convex problem ``min |w|_2^2  s.t.  y_i <w, x_i> - eps |w|_1 >= 1`` with SciPy's SLSQP, writing
``w = a - b`` (``a, b >= 0``) so that ``|w|_1 <= 1^T (a + b)`` makes the constraints linear.

For homogeneous networks (``f(c theta; x) = c^L f(theta; x)``) the normalised margin is
``min_i y_i f(theta; x_i) / |theta|_2^L`` (Lyu & Li, ICLR 2020; Lyu & Zhu, ICLR 2022 for its
adversarial version, where ``x_i`` are the worst-case points).

>>> x = torch.tensor([[1.0, 0.5], [1.0, -0.5], [-1.0, 0.5], [-1.0, -0.5]])
>>> y = torch.tensor([1, 1, 0, 0])
>>> max_margin_direction(x, y).round(decimals=4)
tensor([1., 0.])
>>> float(normalized_margin(torch.tensor([3.0, 0.0]), x, y))
1.0
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import LinearConstraint, minimize
from torch import Tensor, nn

from graddyn.instruments._base import Instrument, Probe

__all__ = [
    "NonSeparableError",
    "NormalizedMargin",
    "angle",
    "linf_margin",
    "max_margin_direction",
    "multiclass_margins",
    "network_margin",
    "normalized_margin",
    "robust_margin",
    "signed_labels",
]

Norm = Literal["l2", "linf"]


class NonSeparableError(ValueError):
    """The data admit no (robust) separator through the origin."""


def signed_labels(y: Tensor) -> Tensor:
    """Labels in {0, 1} or {-1, +1} as float {-1, +1}; anything else is an error.

    >>> signed_labels(torch.tensor([0, 1, 1])).tolist()
    [-1.0, 1.0, 1.0]
    """
    values = set(torch.unique(y).tolist())
    if values <= {-1, 1}:
        return y.to(torch.get_default_dtype())
    if values <= {0, 1}:
        return 2.0 * y.to(torch.get_default_dtype()) - 1.0
    raise ValueError(f"binary labels must be in {{0, 1}} or {{-1, 1}}, got values {sorted(values)}")


def dual_norm(w: Tensor, norm: Norm) -> Tensor:
    """``|w|_*`` of the attack norm: l2 -> l2, l-inf -> l1 (the price of a worst-case attack)."""
    if norm == "l2":
        return w.norm()
    if norm == "linf":
        return w.abs().sum()
    raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")


def robust_margin(w: Tensor, x: Tensor, y: Tensor, eps: float = 0.0, norm: Norm = "l2") -> Tensor:
    """``min_i y_i <w, x_i> - eps |w|_*`` divided by ``|w|_2``: the normalised margin of ``w``
    under the worst perturbation of norm ``<= eps``. Shapes: w (d,), x (n, d), y (n,)."""
    z = signed_labels(y)[:, None] * x.to(w.dtype)
    return ((z @ w).min() - eps * dual_norm(w, norm)) / w.norm()


def normalized_margin(w: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``min_i y_i <w, x_i> / |w|_2`` (clean l2 margin of the linear classifier ``w``)."""
    return robust_margin(w, x, y, 0.0)


def angle(u: Tensor, v: Tensor) -> float:
    """Angle in radians between two vectors, accurate for tiny angles (``atan2`` form).

    >>> round(angle(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])), 6) == round(math.pi / 4, 6)
    True
    """
    u, v = u.flatten().double(), v.flatten().double()
    u, v = u / u.norm(), v / v.norm()
    return float(2 * torch.atan2((u - v).norm(), (u + v).norm()))


def max_margin_direction(
    x: Tensor, y: Tensor, eps: float = 0.0, norm: Norm = "l2", tol: float = 1e-12
) -> Tensor:
    """Unit direction ``u*`` maximising ``min_i y_i <u, x_i> - eps |u|_*`` (see module doc).

    ``norm="l2"`` ignores ``eps`` (the l2 attack only shifts the margin); ``"linf"`` gives the
    max mixed-norm margin direction. Shapes: x (n, d), y (n,) in {0,1} or {-1,1} -> (d,).
    Raises :class:`NonSeparableError` when no separator through the origin has a positive
    robust margin.
    """
    if norm not in ("l2", "linf"):
        raise ValueError(f"norm must be 'l2' or 'linf', got {norm!r}")
    z = (signed_labels(y)[:, None] * x.double()).cpu().numpy()  # (n, d)
    mixed = eps if norm == "linf" else 0.0
    n, d = z.shape
    # variables v = (a, b), w = a - b, a, b >= 0: constraint z (a - b) - mixed 1^T(a + b) >= 1
    a_mat = np.hstack([z - mixed, -z - mixed])

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        w = v[:d] - v[d:]
        return float(w @ w), np.concatenate([2 * w, -2 * w])

    start = _feasible_start(z, mixed, d)
    res = minimize(
        fun, start, jac=True, method="SLSQP", bounds=[(0, None)] * (2 * d),
        constraints=[LinearConstraint(a_mat, lb=np.ones(n), ub=np.inf)],
        options={"ftol": tol, "maxiter": 2000},
    )
    w = res.x[:d] - res.x[d:]
    if not res.success or (z @ w - mixed * np.abs(w).sum()).min() < 1 - 1e-6:
        raise NonSeparableError(
            f"no separator through the origin with positive margin (eps={eps}, norm={norm}); "
            f"SLSQP says: {res.message}. Lower eps or use separable data"
        )
    return torch.as_tensor(w / np.linalg.norm(w), dtype=torch.get_default_dtype())


def _feasible_start(z: np.ndarray, mixed: float, d: int) -> np.ndarray:
    """A feasible point from a hard-margin linear SVM direction (scaled up), else zeros."""
    from scipy.optimize import linprog

    # LP: maximise t s.t. z w - mixed |w|_1 >= t, |w|_inf <= 1 (always bounded)
    n = len(z)
    c = np.zeros(2 * d + 1)
    c[-1] = -1.0
    a_ub = np.hstack([-(z - mixed), -(-z - mixed), np.ones((n, 1))])
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(n), bounds=[(0, 1)] * (2 * d) + [(None, None)])
    t = -res.fun if res.status == 0 else 0.0
    if t <= 1e-12:
        raise NonSeparableError(
            f"the data have no separator through the origin with positive margin "
            f"(mixed-norm eps={mixed}); lower eps or use separable data"
        )
    return res.x[:-1] / t


def linf_margin(x: Tensor, y: Tensor) -> float:
    """``max_{|w|_1 <= 1} min_i y_i <w, x_i>``: the largest l-inf attack radius that still
    leaves a robust separator through the origin (an LP; 0 or less: not separable)."""
    from scipy.optimize import linprog

    z = (signed_labels(y)[:, None] * x.double()).cpu().numpy()
    n, d = z.shape
    c = np.zeros(2 * d + 1)
    c[-1] = -1.0  # variables (a, b, t), w = a - b; maximise t
    a_ub = np.vstack([
        np.hstack([-z, z, np.ones((n, 1))]),  # t - z w <= 0
        np.concatenate([np.ones(2 * d), [0.0]])[None],  # 1^T (a + b) <= 1
    ])
    b_ub = np.concatenate([np.zeros(n), [1.0]])
    res = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=[(0, None)] * (2 * d) + [(None, None)])
    return float(-res.fun)


def network_margin(outputs: Tensor, y: Tensor, model: nn.Module, degree: int) -> Tensor:
    """``min_i q_i / |theta|_2^degree`` with ``q_i`` the margins of ``outputs``
    (see :func:`multiclass_margins`): the normalised margin of a ``degree``-homogeneous net."""
    norm = torch.sqrt(sum(p.detach().double().square().sum() for p in model.parameters()))
    return multiclass_margins(outputs, y).min() / norm**degree


def multiclass_margins(outputs: Tensor, y: Tensor) -> Tensor:
    """Per-example margins: ``y_i f(x_i)`` for scores (B,) or (B, 1) with binary labels, else
    ``f_y(x_i) - max_{j != y} f_j(x_i)`` for logits (B, K). -> (B,)."""
    outputs = outputs.detach()
    if outputs.ndim == 1 or outputs.shape[-1] == 1:
        return signed_labels(y).to(outputs.dtype) * outputs.reshape(-1)
    true = outputs.gather(1, y[:, None]).squeeze(1)
    other = outputs.scatter(1, y[:, None], -math.inf).amax(dim=1)
    return true - other


class NormalizedMargin(Instrument, name="margin"):
    """Smallest normalised margin over the probe batches: ``min_i q_i / |theta|^degree``.

    Uses ``probe.outputs`` (scores or logits), ``probe.targets`` and ``probe.model``; feed
    worst-case inputs' outputs to get the adversarial (robust) normalised margin.
    """

    needs_grads = False

    def __init__(self, degree: int = 1) -> None:
        if degree < 1:
            raise ValueError(f"degree (homogeneity order L) must be >= 1, got {degree}")
        self.degree = degree
        self.add_state("_norm_min", math.inf, "min")  # smallest normalised margin so far
        self.add_state("_raw_min", math.inf, "min")  # smallest raw margin q_i so far

    def update(self, probe: Probe) -> None:
        if probe.outputs is None or probe.targets is None or probe.model is None:
            raise ValueError("NormalizedMargin needs probe.outputs, probe.targets and probe.model")
        m = network_margin(probe.outputs, probe.targets, probe.model, self.degree)
        raw = multiclass_margins(probe.outputs, probe.targets).min()
        self._norm_min = min(self._norm_min, float(m))
        self._raw_min = min(self._raw_min, float(raw))

    def compute(self) -> dict[str, Any]:
        return {"normalized": self._norm_min, "min_margin": self._raw_min}
