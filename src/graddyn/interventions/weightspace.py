"""Weight-space operations between networks of one architecture.

The cumulative gradient of a training run is ``g_A = thetaT_A - theta0_A``; it can be
transferred onto another initialisation (``theta' = theta0_B + alpha * g_A``), a trained
model can be fused into another (``theta_n + alpha * theta_A``), and two models can be joined
by a straight line whose loss barrier measures linear mode connectivity (Frankle et al.,
"Linear Mode Connectivity and the Lottery Ticket Hypothesis", ICML 2020). Permutation
alignment lives in :mod:`graddyn.interventions.alignment`.

Every operation is a pure function on *states*: either a ``Mapping[str, Tensor]`` (a
``state_dict``) or a single parameter vector ``Tensor (P,)``. Floating-point entries are
combined; integer entries (batch norm's ``num_batches_tracked``) are copied from the first
argument. Two states must have the same names in the same order and the same shapes, else
:class:`ArchitectureMismatchError` names the first mismatch.

After any edit, a model with batch norm has stale running statistics: call
:func:`recompute_bn_stats` (done by :func:`barrier` when it is given data).

>>> a = {"w": torch.ones(2)}; b = {"w": torch.zeros(2)}
>>> interpolate(a, b, 0.25)["w"]
tensor([0.7500, 0.7500])
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from graddyn.models._utils import evaluate  # re-exported: its callers import it from here

State = Mapping[str, Tensor] | Tensor
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

__all__ = [
    "ArchitectureMismatchError",
    "BarrierResult",
    "barrier",
    "check_compatible",
    "cumulative_gradient",
    "evaluate",
    "fuse",
    "interpolate",
    "model_state",
    "recompute_bn_stats",
    "scaled_plus_noise",
    "state_norm",
    "transfer",
    "transfer_deviation",
    "zeros_like_state",
]


class ArchitectureMismatchError(ValueError):
    """Two states (or models) do not share names and shapes; the message names the first."""


def model_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached copy of ``model.state_dict()`` (parameters and buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def check_compatible(a: State, b: State, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise :class:`ArchitectureMismatchError` naming the first differing entry of ``a``, ``b``."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            raise ArchitectureMismatchError(
                f"{names[0]} and {names[1]} must both be state dicts or both be tensors"
            )
        if a.shape != b.shape:
            raise ArchitectureMismatchError(
                f"shape mismatch: {names[0]} has {tuple(a.shape)}, {names[1]} has {tuple(b.shape)}"
            )
        return
    ka, kb = list(a), list(b)
    for i, (x, y) in enumerate(zip(ka, kb)):
        if x != y:
            raise ArchitectureMismatchError(
                f"entry {i} differs: {names[0]} has {x!r}, {names[1]} has {y!r}; "
                "the models must have the same architecture"
            )
        if a[x].shape != b[y].shape:
            raise ArchitectureMismatchError(
                f"shape mismatch at {x!r}: {names[0]} has {tuple(a[x].shape)}, "
                f"{names[1]} has {tuple(b[y].shape)}"
            )
    if len(ka) != len(kb):
        longer, extra = (names[0], ka) if len(ka) > len(kb) else (names[1], kb)
        raise ArchitectureMismatchError(
            f"{longer} has an extra entry {extra[min(len(ka), len(kb))]!r}; "
            "the models must have the same architecture"
        )


def _combine(fn: Callable[..., Tensor], *states: State) -> State:
    """Apply ``fn`` entrywise to floating entries; copy integer entries from ``states[0]``."""
    for s in states[1:]:
        check_compatible(states[0], s, ("first state", "other state"))
    if isinstance(states[0], Tensor):
        return fn(*states)
    out = {}
    for k, v in states[0].items():
        out[k] = fn(*(s[k] for s in states)) if v.is_floating_point() else v.clone()
    return out


def cumulative_gradient(theta0: State, thetaT: State) -> State:
    """Cumulative gradient of a run, ``g = thetaT - theta0`` (same shapes as the inputs).

    For plain SGD with step ``eta`` this is ``-eta * sum_t grad L(theta_t)``.
    """
    return _combine(lambda a, b: b - a, theta0, thetaT)


def transfer(theta0_B: State, g_A: State, alpha: float) -> State:
    """Transfer a cumulative gradient: ``theta' = theta0_B + alpha * g_A``.

    ``theta0_B`` is any initialisation: ``theta0_A`` itself (``alpha = 1`` returns
    ``thetaT_A``), another seed's init, or :func:`zeros_like_state` (gives ``alpha * g_A``).
    """
    return _combine(lambda t, g: t + alpha * g, theta0_B, g_A)


def fuse(theta_n: State, theta_A: State, alpha: float) -> State:
    """Fuse a trained model into another: ``theta_n + alpha * theta_A``."""
    return _combine(lambda n, a: n + alpha * a, theta_n, theta_A)


def interpolate(a: State, b: State, t: float) -> State:
    """Linear path ``(1 - t) * a + t * b``; ``t = 0`` gives ``a``, ``t = 1`` gives ``b``."""
    return _combine(lambda x, y: x + t * (y - x) if t != 1 else y.clone(), a, b)


def zeros_like_state(state: State) -> State:
    """The zero initialisation: floating entries set to 0 (integer entries copied)."""
    return _combine(torch.zeros_like, state)


def transfer_deviation(theta0_B: State, theta0_A: State, alpha: float) -> State:
    """What a transfer adds to the rescaled trained net: ``theta' - alpha * thetaT_A``.

    Since ``theta' = theta0_B + alpha * (thetaT_A - theta0_A)``, the deviation is
    ``theta0_B - alpha * theta0_A``. Its norm is the noise norm matched by the
    :func:`scaled_plus_noise` baseline.
    """
    return _combine(lambda b, a: b - alpha * a, theta0_B, theta0_A)


def _selected(state: State, keys: Iterable[str] | None) -> list[str]:
    if isinstance(state, Tensor):
        return []
    names = [k for k, v in state.items() if v.is_floating_point()]
    if keys is None:
        return names
    keys = list(keys)
    unknown = [k for k in keys if k not in state]
    if unknown:
        raise KeyError(f"unknown state entries {unknown}; valid: {names}")
    return keys


def state_norm(state: State, keys: Iterable[str] | None = None) -> float:
    """Euclidean norm over the floating entries named in ``keys`` (default: all)."""
    if isinstance(state, Tensor):
        return float(state.norm())
    sq = sum(float(state[k].pow(2).sum()) for k in _selected(state, keys))
    return sq**0.5


def _unit_direction(like: Tensor, generator: torch.Generator | None) -> Tensor:
    z = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return z / z.norm()


def scaled_plus_noise(
    theta_A: State,
    scale: float,
    noise_norm: float | Mapping[str, float],
    generator: torch.Generator | None = None,
    keys: Iterable[str] | None = None,
) -> State:
    """Baseline ``scale * theta_A + eps`` with isotropic Gaussian ``eps`` of a given norm.

    ``noise_norm`` a float: ``||eps|| == noise_norm`` over all selected entries together.
    ``noise_norm`` a mapping ``name -> norm``: per-tensor norms ``||eps[name]|| == norm``
    (entries not in the mapping get no noise). To match a transfer
    ``theta' = theta0_B + alpha * g_A``, use ``scale = alpha`` and the per-tensor norms of
    :func:`transfer_deviation` (``||theta0_B - alpha * theta0_A||`` per tensor), so the
    baseline and the transfer are the same distance from ``alpha * thetaT_A`` in every tensor.

    >>> s = scaled_plus_noise({"w": torch.ones(4)}, 2.0, 3.0, torch.Generator().manual_seed(0))
    >>> round(float((s["w"] - 2.0).norm()), 6)
    3.0
    """
    if isinstance(theta_A, Tensor):
        if not isinstance(noise_norm, (int, float)):
            raise TypeError("a tensor state needs a float noise_norm")
        return scale * theta_A + noise_norm * _unit_direction(theta_A, generator)
    out = {k: (scale * v if v.is_floating_point() else v.clone()) for k, v in theta_A.items()}
    if isinstance(noise_norm, Mapping):
        for k in _selected(theta_A, noise_norm.keys()):
            out[k] = out[k] + noise_norm[k] * _unit_direction(theta_A[k], generator)
        return out
    names = _selected(theta_A, keys)
    flat = torch.cat([theta_A[k].reshape(-1) for k in names])
    eps = noise_norm * _unit_direction(flat, generator)
    for k, chunk in zip(names, eps.split([theta_A[k].numel() for k in names])):
        out[k] = out[k] + chunk.view_as(theta_A[k])
    return out


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, x: Tensor, batch_size: int = 256) -> int:
    """Recompute batch-norm running statistics after a weight-space edit; returns #BN layers.

    Steps: (1) ``reset_running_stats()`` on every BatchNorm layer; (2) set ``momentum=None``
    (a cumulative average with equal weight per batch); (3) forward ``x`` in chunks of
    ``batch_size`` in train mode without gradients; (4) restore momenta and train/eval modes.
    The result: ``running_mean`` is the mean over chunks of the chunk means of the layer
    input, ``running_var`` the mean over chunks of their unbiased variances.
    ``x``: ``(N, *input_shape)``. A model without batch norm is left untouched.
    """
    bns = [m for m in model.modules() if isinstance(m, _BN)]
    if not bns:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for xb in x.split(batch_size):
        model(xb)
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    for m, was_training in modes.items():
        m.training = was_training
    return len(bns)


@dataclass(frozen=True)
class BarrierResult:
    """Loss and accuracy along ``(1 - t) a + t b`` at ``ts``; barriers as defined below."""

    ts: np.ndarray  # (n_points,)
    losses: np.ndarray  # (n_points,)
    accuracies: np.ndarray  # (n_points,) fractions
    loss_barrier: float  # max_t [L(t) - ((1 - t) L(0) + t L(1))]
    accuracy_barrier: float  # max_t [((1 - t) A(0) + t A(1)) - A(t)]


def barrier(
    model: nn.Module,
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    data: tuple[Tensor, Tensor],
    n_points: int = 11,
    bn_data: Tensor | None = None,
) -> BarrierResult:
    """Loss/accuracy barrier on the linear path between two states (Frankle et al. 2020).

    ``loss_barrier = max_t [L((1-t) a + t b) - ((1-t) L(a) + t L(b))]`` over ``n_points``
    evenly spaced ``t`` in [0, 1]; 0 means linearly mode connected (on this grid). ``data`` is
    ``(x (N, ...), y (N,))``. With batch norm, statistics are recomputed at every point on
    ``bn_data`` (default: ``data[0]``). ``model`` supplies the architecture; its own state is
    restored afterwards. Cost: ``n_points`` evaluations on ``data``.
    """
    if n_points < 2:
        raise ValueError(f"n_points must be >= 2 to include both endpoints, got {n_points}")
    check_compatible(a, b, ("a", "b"))
    check_compatible(model.state_dict(), a, ("model", "a"))
    saved = model_state(model)
    ts = np.linspace(0.0, 1.0, n_points)
    losses, accs = np.empty(n_points), np.empty(n_points)
    for i, t in enumerate(ts):
        model.load_state_dict(interpolate(a, b, float(t)))
        recompute_bn_stats(model, data[0] if bn_data is None else bn_data)
        losses[i], accs[i] = evaluate(model, *data)
    model.load_state_dict(saved)
    lin_l = (1 - ts) * losses[0] + ts * losses[-1]
    lin_a = (1 - ts) * accs[0] + ts * accs[-1]
    return BarrierResult(
        ts, losses, accs, float(np.max(losses - lin_l)), float(np.max(lin_a - accs))
    )
