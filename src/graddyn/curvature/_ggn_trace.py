"""Hutchinson's trace estimator for piecewise-linear networks from Jacobian-vector products.

For ``L = loss(f(theta))``, ``H = G + R`` with the Gauss-Newton part ``G = J^T H_out J`` and
``R = sum_k (dL/df_k) d^2 f_k / d theta^2``. When ``f`` is piecewise linear in each scalar
parameter (ReLU networks; see ``_linearity``), ``R`` has a zero diagonal, so
``tr(H) = tr(G)`` and, for Rademacher vectors ``z``,

    E[z^T G z] = tr(G) = tr(H),       z^T G z = sum_n (J_n z)^T H_out,n (J_n z).

So each vector needs only ``J z``, never a second derivative. Writing ``H_out,n = sum_j
s_nj u_nj u_nj^T`` (``r`` directions, ``output_hessian_factor``) and ``delta_lj`` for the
gradient of ``<u_j, f>`` at the output of layer ``l`` (``r`` backward passes, once per batch,
as in ``exact_trace``),

    u_nj^T J_n z = sum_l <delta_lj,n , t_l,n(z_l)>,   t_l(z_l) = d out_l / d theta_l . z_l,

where ``t_l`` is the tangent of layer ``l``'s output when only its own parameters move (its
input held fixed): for a Linear or Conv layer one product with the vector's weights, i.e. one
forward pass of the layer per vector, with no tangent propagated through the network. A
Hessian-vector product for ``z^T H z`` costs a forward, a backward and both their tangents.
Same vectors, same expectation; the variance is ``2 sum_{i != j} G_ij^2`` instead of
``2 sum_{i != j} H_ij^2`` (``R`` lives entirely off the diagonal, so it adds no bias, only
its own noise to ``z^T H z``; on the benchmark nets the two standard errors are equal).

``exact_trace`` gives the value both converge to, exactly; this estimator is for when a
vector budget, a stopping rule or vectors shared with another estimator are wanted, and for
losses whose output Hessian has a large rank (many classes), where ``exact_trace`` needs one
backward per direction.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, jvp, vmap

from graddyn.curvature._exact import output_hessian_factor
from graddyn.curvature._linearity import ModuleSpans, check_piecewise_linear, uses_outside_owner
from graddyn.curvature._matmat import as_square
from graddyn.curvature._operator import HessianOperator
from graddyn.curvature._trace import TraceEstimate, hutchinson_loop


def ggn_hutchinson_trace(op: HessianOperator, max_vectors: int = 100, *, batch_size: int = 10,
                         rtol: float | None = None, min_vectors: int = 10,
                         generator: torch.Generator | None = None) -> TraceEstimate:
    """``tr(H)`` of a piecewise-linear network by Hutchinson's estimator on the Gauss-Newton
    part: ``(1/m) sum_i z_i^T G z_i`` with Rademacher ``z_i``, which has expectation ``tr(H)``
    here (see the module docstring). Arguments and stopping rule as
    :func:`hutchinson_trace` (the same ``generator`` draws the same vectors); each vector costs
    one Jacobian-vector product (``batch_size`` vectors vmapped per pass).

    Raises :class:`NotPiecewiseLinearError` (naming the module) for a network that is not
    piecewise linear in the selected parameters, where ``tr(G) != tr(H)``; ``ValueError``
    for a loss that couples the examples of a batch.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 4))
        >>> x, y = torch.randn(16, 3), torch.randint(0, 4, (16,))
        >>> op = HessianOperator(net, F.cross_entropy, (x, y))
        >>> est = ggn_hutchinson_trace(op, 50)
        >>> abs(est.value - op.to_dense().trace().item()) < 4 * est.std_error  # unbiased
        True
    """
    if not isinstance(op, HessianOperator):
        raise TypeError(f"ggn_hutchinson_trace needs a HessianOperator (it reads the model, "
                        f"loss and data), got {type(op).__name__}; for a matrix use "
                        "hutchinson_trace")
    forms = GaussNewtonForms(op)
    square = as_square(op)
    return hutchinson_loop(forms, lambda k: square.random_vectors(k, generator), max_vectors,
                           batch_size, rtol, min_vectors)


class GaussNewtonForms:
    """``Z (P, K) -> (z_k^T G z_k)_k (K,)`` float64 for ``G`` the Gauss-Newton matrix of
    ``op``'s loss. Each batch's set-up (forward, linearity check, output Hessian factor and
    the ``r`` layer-output gradients ``delta``) is done on first use and kept, so it is paid
    once per estimator call, not once per chunk of vectors.

    ``per_layer=True`` (default) reads ``J z`` from the layers' own tangents (module
    docstring); it needs what ``exact_trace`` needs (each selected parameter used in one call
    of its own module) and falls back to a full Jacobian-vector product through the network
    (``per_layer=False``) where that does not hold. Memory of the set-up: ``r`` layer-output
    gradients per example (``r = C - 1`` for ``C``-class cross-entropy)."""

    def __init__(self, op: HessianOperator, per_layer: bool = True) -> None:
        self.op, self.per_layer = op, per_layer
        self._setup: dict[int, Any] = {}  # batch -> _Layers or (seeds, signs)

    def __call__(self, Z: Tensor) -> Tensor:
        Z = Z.to(device=self.op.device, dtype=self.op.dtype)
        return self.op._accumulate(self._batch_forms, Z)

    def _batch_forms(self, b: int, x: Any, y: Tensor, Z: Tensor) -> Tensor:
        op = self.op
        setup = self._setup.get(b)
        if isinstance(setup, _Layers):  # the per-layer path reads only its own set-up
            return setup.forms(Z, op).to(torch.float64)
        named = dict(op.model.named_parameters())
        frozen = {n: t.detach() for n, t in named.items() if n not in op.names}
        frozen.update(op.model.named_buffers())
        theta = tuple(named[n].detach() for n in op.names)
        if setup is None:
            setup = self._setup[b] = self._prepare(x, y, frozen, theta)
            if isinstance(setup, _Layers):
                return setup.forms(Z, op).to(torch.float64)
        seeds, signs = setup  # (r, N, D), (r, N)

        def outputs(*ps: Tensor) -> Tensor:
            return functional_call(op.model, {**frozen, **dict(zip(op.names, ps))}, (x,))

        def form(z: Tensor) -> Tensor:  # (P,) -> (): z^T G z on this batch
            u = jvp(outputs, theta, op._tangents(z))[1].reshape(seeds.shape[1:])  # J z (N, D)
            proj = torch.einsum("rnd,nd->rn", seeds, u)  # (r, N)
            return (signs * proj * proj).sum()

        return vmap(form, chunk_size=op.chunk_size)(Z.T.contiguous()).to(torch.float64)

    def _prepare(self, x: Any, y: Tensor, frozen: dict[str, Tensor],
                 theta: tuple[Tensor, ...]) -> Any:
        """One batch's set-up, after checking that tr(G) = tr(H) there."""
        op = self.op
        leaves = {n: t.clone().requires_grad_(True) for n, t in zip(op.names, theta)}
        spans = ModuleSpans()
        with torch.enable_grad(), spans.record(op.model), _record_layers(op.model,
                                                                          leaves) as calls:
            out = functional_call(op.model, {**frozen, **leaves}, (x,))
        if not isinstance(out, Tensor) or out.ndim == 0:
            raise ValueError(f"ggn_hutchinson_trace needs a model that returns one (N, ...) "
                             f"tensor, got {type(out).__name__}; use hutchinson_trace(op)")
        check_piecewise_linear(out, leaves, spans)
        per_layer = self.per_layer
        if per_layer:
            try:
                _check_calls(calls, out, leaves, spans)
            except ValueError:
                per_layer = False  # e.g. a parameter used outside its module: full JVP
        seeds, signs = output_hessian_factor(op.loss_fn, out, y)  # (r, N, ...), (r, N)
        n = out.shape[0]
        if not per_layer or len(seeds) == 0:
            return seeds.reshape(len(seeds), n, -1).detach(), signs.detach()
        return _Layers.build(calls, out, seeds, signs)


@dataclass
class _LayerCall:
    name: str  # in model.named_modules()
    label: str
    module: nn.Module
    args: tuple[Any, ...]
    out: Tensor
    version: int
    state: dict[str, Tensor]  # the module's parameters and buffers (with children's), as used
    wanted: list[str]  # its selected parameters


@contextmanager
def _record_layers(model: nn.Module, theta: dict[str, Tensor]) -> Iterator[list[_LayerCall]]:
    """Record every call of a module that owns selected parameters (input, output, state)."""
    selected = {id(t) for t in theta.values()}
    calls: list[_LayerCall] = []

    def hook(m: nn.Module, args: tuple, _kwargs: dict, out: Any, name: str) -> None:
        own = dict(m.named_parameters(recurse=False))
        wanted = [k for k, p in own.items() if id(p) in selected]
        label = f"'{name or type(model).__name__}' ({type(m).__name__})"
        if wanted and isinstance(out, Tensor):
            state = {**dict(m.named_parameters()), **dict(m.named_buffers())}
            calls.append(_LayerCall(name, label, m, args, out, out._version, state, wanted))
        elif wanted:
            raise ValueError(f"module {label} returns {type(out).__name__}, not a tensor: "
                             "exact_trace has no rule for it; use hutchinson_trace(op)")

    handles = []
    for name, m in model.named_modules():
        handles.append(m.register_forward_hook(
            lambda m, a, k, o, name=name: hook(m, a, k, o, name), with_kwargs=True))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def _check_calls(calls: list[_LayerCall], out: Tensor, theta: dict[str, Tensor],
                 spans: ModuleSpans) -> None:
    """Each selected parameter is used in exactly one recorded call, that of its module, and
    that call's output was not overwritten: what the per-layer rules assume."""
    owner_span: dict[str, tuple[int, int]] = {}
    for c in calls:
        if len(spans.by_module[id(c.module)]) > 1:
            raise ValueError(f"module {c.label} is called more than once in one forward: its "
                             "per-example gradients would have to add over the calls before "
                             "squaring, which exact_trace does not do; use hutchinson_trace(op)")
        if c.out._version != c.version:
            raise ValueError(f"the output of module {c.label} was modified in place after the "
                             "forward (e.g. nn.ReLU(inplace=True)); use inplace=False")
        for attr in c.wanted:
            owner_span[f"{c.name}.{attr}" if c.name else attr] = spans.by_module[id(c.module)][0]
    outside = uses_outside_owner(out, theta, owner_span)
    if outside:
        raise ValueError(f"parameters {outside} are used outside the forward of the module that "
                         "owns them (e.g. F.linear(x, self.fc.weight), or tied weights), where "
                         "the per-layer rules of exact_trace do not see them; use "
                         "hutchinson_trace(op)")


class _Layers:
    """Per-batch set-up of the per-layer forms: for each recorded layer call its detached
    inputs and state, the selected attributes, and ``delta (N, r, E)`` (gradients of the
    ``r`` output directions at its output, ``E`` = output elements per example)."""

    def __init__(self, calls: list, deltas: list[Tensor], signs: Tensor) -> None:
        self.calls, self.deltas, self.signs = calls, deltas, signs  # signs (N, r)

    @classmethod
    def build(cls, calls: list, out: Tensor, seeds: Tensor, signs: Tensor) -> _Layers:
        r, n = len(seeds), out.shape[0]
        per_dir = [torch.autograd.grad(out, [c.out for c in calls], seeds[j],
                                       retain_graph=j < r - 1, allow_unused=True)
                   for j in range(r)]
        kept, deltas = [], []
        for i, c in enumerate(calls):
            if all(d[i] is None for d in per_dir):
                continue  # this layer does not reach the output
            ds = [torch.zeros_like(c.out) if d[i] is None else d[i] for d in per_dir]
            deltas.append(torch.stack([d.reshape(n, -1) for d in ds], 1).detach())  # (N, r, E)
            args = tuple(a.detach() if isinstance(a, Tensor) else a for a in c.args)
            state = {k: t.detach() for k, t in c.state.items()}
            full = [f"{c.name}.{a}" if c.name else a for a in c.wanted]
            kept.append((c.module, args, state, list(c.wanted), full))
        return cls(kept, deltas, signs.T.contiguous().detach())

    def forms(self, Z: Tensor, op: HessianOperator) -> Tensor:
        """Quadratic forms of the vectors ``Z (P, K)`` on this batch -> (K,)."""
        n, r = self.signs.shape
        out = []
        for Zc in Z.T.contiguous().split(op.chunk_size or Z.shape[1]):  # (k, P) rows
            k = Zc.shape[0]
            parts = dict(zip(op.names, (t.view(k, *s) for t, s in
                                        zip(Zc.split(op.numels, 1), op.shapes))))
            proj = Zc.new_zeros(n, r, k)  # u_nj^T J_n z_k
            for (module, args, state, attrs, full), delta in zip(self.calls, self.deltas):
                t = _own_tangent(module, args, state, attrs, [parts[f] for f in full], n, k)
                proj += torch.bmm(delta, t.transpose(1, 2))  # (N, r, E) @ (N, E, k)
            out.append(torch.einsum("nr,nrk->k", self.signs, proj * proj))
        return torch.cat(out)


_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _own_tangent(module: nn.Module, args: tuple, state: dict[str, Tensor], attrs: list[str],
                 tangents: list[Tensor], n: int, k: int) -> Tensor:
    """Tangent of the layer's output when only its own parameters ``attrs`` move along
    ``tangents`` (each (k, *param.shape)) -> (N, k, E).

    Linear and Conv (one group) are affine in (weight, bias), so the tangent is the layer
    itself with the vectors' weights: the k vectors go in as k x out channels of one matmul /
    convolution (no primal pass, no forward-mode bookkeeping). Any other layer: a vmapped
    ``torch.func.jvp`` of the layer in its parameters."""
    v = dict(zip(attrs, tangents))
    x = args[0] if len(args) == 1 and isinstance(args[0], Tensor) else None
    if (type(module) in _AFFINE and x is not None and "weight" in v
            and getattr(module, "groups", 1) == 1
            and getattr(module, "padding_mode", "zeros") == "zeros"):
        w = v["weight"]  # (k, out, *rest)
        w2 = w.reshape(k * w.shape[1], *w.shape[2:])  # vectors as extra output channels
        b = v["bias"].reshape(-1) if "bias" in v else None  # an unselected bias: no tangent
        if isinstance(module, nn.Linear):
            t = F.linear(x, w2, b)  # (N, *, k out)
            t = t.reshape(n, -1, k, w.shape[1]).transpose(1, 2)  # (N, k, T, out)
        else:
            conv = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}[type(module)]
            t = conv(x, w2, b, module.stride, module.padding, module.dilation, 1)
        return t.reshape(n, k, -1)
    prim = tuple(state[a] for a in attrs)

    def layer(*ps: Tensor) -> Tensor:
        return functional_call(module, {**state, **dict(zip(attrs, ps))}, args)

    t = vmap(lambda *vs: jvp(layer, prim, vs)[1])(*tangents)  # (k, N, *out)
    return t.reshape(k, n, -1).transpose(0, 1)
