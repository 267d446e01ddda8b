"""The exact Hessian trace of a piecewise-linear network, without random vectors.

For ``L = loss(f(theta))`` the Hessian is ``H = J^T H_out J + sum_k (dL/df_k) d^2 f_k /
d theta^2`` (``J = df/dtheta``, ``H_out = d^2 L / df^2``). When ``f`` is piecewise linear in each
scalar parameter (ReLU networks: Linear/Conv, ReLU, pooling, eval BatchNorm), ``d^2 f_k /
d theta_i^2 = 0``, so the diagonal of the second term vanishes and (almost everywhere)

    tr(H) = tr(J^T H_out J) = sum_n <H_out,n , J_n J_n^T>
          = sum_n sum_j lambda_nj ||J_n^T u_nj||^2,

with ``H_out,n = sum_j lambda_nj u_nj u_nj^T`` the output Hessian of example n (a ``D x D``
block: the loss must not couple examples) and ``J_n^T u_nj`` the gradient of
``<u_nj, f_n>``: a per-example gradient. So ``r = rank(H_out,n)`` backward passes (``C - 1``
for softmax cross-entropy with ``C`` classes) and per-example squared gradient norms give the
exact trace that Hutchinson's estimator converges to: no Monte-Carlo error, no random vectors.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from graddyn.curvature._linearity import ModuleSpans, check_piecewise_linear
from graddyn.curvature._operator import HessianOperator
from graddyn.curvature._trace import TraceEstimate
from graddyn.pergrad import ExactPathWarning

LossFn = Callable[[Tensor, Tensor], Tensor]


def exact_trace(op: HessianOperator) -> TraceEstimate:
    """``tr(H)`` exactly for a network piecewise linear in the selected parameters.

    Uses the operator's model, loss, batches, parameter selection and ``eval_mode``; see the
    module docstring for the formula (a Gauss-Newton identity that holds because the
    network's second derivative in each single parameter vanishes). Raises
    :class:`NotPiecewiseLinearError` naming the module for anything else (tanh, GELU,
    LayerNorm, training-mode BatchNorm, a weight multiplied by itself; with ``params``
    restricted to the last layer any network qualifies), and ``ValueError`` for a loss that
    couples the examples of a batch (checked on each batch with one random vector of the
    loss's Hessian). Any loss of the outputs that sums over examples works (cross-entropy,
    MSE, ...). The per-example gradient norms come from the engine (``graddyn.capture``), so
    a layer called twice, a weight also used outside its module, or a layer without a
    closed-form rule are all served exactly.

    Cost per batch: one forward, ``r`` backward passes from the output to the first selected
    layer (``r = C - 1`` for softmax cross-entropy over ``C`` classes, ``D`` for MSE on ``D``
    outputs), and per layer one per-example gradient norm per direction (the engine's ghost or
    materialised form, whichever is cheaper). Measured against PyHessian in
    ``docs/benchmarks_curvature.md``. Prefer Hutchinson when ``r`` is large (e.g. 1000
    classes).

    Returns a :class:`TraceEstimate` with ``std_error=0``, ``num_matvecs=0``, ``converged=True``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 4, (16,))
        >>> op = HessianOperator(net, nn.functional.cross_entropy, (x, y))
        >>> abs(exact_trace(op).value - op.to_dense().trace().item()) < 1e-4  # = dense trace
        True
    """
    if not isinstance(op, HessianOperator):
        raise TypeError(f"exact_trace needs a HessianOperator (it reads the model, loss and "
                        f"data), got {type(op).__name__}; for a matrix or another operator use "
                        "hutchinson_trace")
    total = op._accumulate(lambda _b, x, y, _V: _batch_trace(op, x, y),
                           torch.zeros(0, dtype=op.dtype, device=op.device))
    return TraceEstimate(float(total), 0.0, 0, True)


def _batch_trace(op: HessianOperator, x: Any, y: Tensor) -> Tensor:
    """``sum_n sum_j lambda_nj ||g_nj||^2`` on one batch: ``g_nj`` the per-example gradient of
    ``<u_nj, f_n>``, from the per-example engine (``graddyn.capture``: its rules, tied and
    reused weights, the exact path for anything else), one backward per direction j."""
    from graddyn.pergrad import capture

    named = dict(op.model.named_parameters())
    theta = {n: named[n] for n in op.names}
    frozen = {n: p.requires_grad for n, p in theta.items()}
    spans = ModuleSpans()
    try:
        for p in theta.values():
            p.requires_grad_(True)
        with torch.enable_grad(), spans.record(op.model), capture(op.model, op.names) as cap:
            out = op.model(x)
        if not isinstance(out, Tensor) or out.ndim == 0:
            raise ValueError(f"exact_trace needs a model that returns one (N, ...) tensor, got "
                             f"{type(out).__name__}; use hutchinson_trace(op) instead")
        check_piecewise_linear(out, theta, spans)
        seeds, signs = output_hessian_factor(op.loss_fn, out, y)  # (r, N, ...), (r, N)
        total = torch.zeros((), dtype=torch.float64, device=out.device)
        n = out.shape[0]
        with warnings.catch_warnings():  # the exact path is exact: nothing to warn about here
            warnings.simplefilter("ignore", ExactPathWarning)
            for j in range(len(seeds)):  # one backward per eigen-direction of the output Hessian
                losses = (seeds[j] * out).reshape(n, -1).sum(1)  # <u_nj, f_n>, (N,)
                sq = cap.backward(losses, retain_graph=j < len(seeds) - 1).norms().square()
                total = total + (signs[j] * sq).sum().to(torch.float64)
    finally:
        for name, flag in frozen.items():
            theta[name].requires_grad_(flag)
    return total


def output_hessian_factor(loss_fn: LossFn, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``H_out,n = sum_j signs[j, n] seeds[j, n] seeds[j, n]^T`` for each example's ``D x D``
    block of ``d^2 loss / d out^2``; returns ``seeds (r, *out.shape)`` and ``signs (r, N)``.

    The blocks come from ``D`` Hessian-vector products of the loss in its outputs (tangent:
    unit vector d in every example at once), which is the block diagonal only if the loss
    does not couple examples; one extra product with a random tangent checks that. Directions
    whose eigenvalue is at rounding level (``<= 10 D eps max|lambda_n|``) in every example are
    dropped (the constant direction of softmax cross-entropy), so ``r <= D``.
    """
    n = out.shape[0]
    o = out.detach().reshape(n, -1).requires_grad_(True)  # (N, D)
    d = o.shape[1]
    with torch.enable_grad():
        g = torch.autograd.grad(loss_fn(o.view_as(out), y), o, create_graph=True)[0]
    if not g.requires_grad:  # a loss linear in the outputs: H_out = 0
        return out.new_zeros(0, *out.shape), out.new_zeros(0, n)

    def hvp(t: Tensor) -> Tensor:  # (N, D) -> (N, D)
        h = torch.autograd.grad(g, o, t, retain_graph=True, allow_unused=True)[0]
        return torch.zeros_like(t) if h is None else h

    eye = torch.eye(d, dtype=o.dtype, device=o.device)
    H = torch.stack([hvp(eye[k].expand(n, d)) for k in range(d)], 2)  # (N, D, D): H[n, :, k]
    vector = torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(o)
    full, blocks = hvp(vector), torch.einsum("nik,nk->ni", H, vector)
    tol = 1e3 * torch.finfo(o.dtype).eps * full.abs().max().item()
    if not torch.allclose(full, blocks, rtol=0, atol=tol):
        raise ValueError("the loss couples the examples of a batch (its Hessian in the outputs "
                         "is not block diagonal over examples), which exact_trace needs; use "
                         "hutchinson_trace(op) instead")
    lam, U = torch.linalg.eigh(((H + H.transpose(1, 2)) / 2).to(torch.float64))  # (N, D)
    order = lam.abs().argsort(1, descending=True)
    lam = lam.gather(1, order)
    U = U.gather(2, order[:, None, :].expand_as(U))  # columns: eigenvectors
    noise = 10 * d * torch.finfo(o.dtype).eps * lam.abs()[:, :1]  # (N, 1)
    r = int((lam.abs() > noise).any(0).sum())  # sorted, so the kept directions are a prefix
    seeds = (U[:, :, :r] * lam[:, None, :r].abs().sqrt()).permute(2, 0, 1)  # (r, N, D)
    return seeds.to(out.dtype).reshape(r, *out.shape), lam[:, :r].sign().T.to(out.dtype)
