"""The Hessian of a model's loss as a linear operator over a subset of its parameters.

Flattening convention (shared by every operator and estimator here): a vector of length
``P = sum(p.numel())`` is the concatenation of ``p.flatten()`` for the selected parameters in
the order of ``model.named_parameters()``; ``op.names`` / ``op.shapes`` list them and
``op.flatten`` / ``op.unflatten`` convert between the flat form and a ``{name: tensor}`` dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from graddyn.curvature._graph import LOOP_MIN_FLOPS, GradGraph, forward_flops, weights_key
from graddyn.curvature._matmat import as_square

Batch = tuple[Any, Tensor]
LossFn = Callable[[Tensor, Tensor], Tensor]

# Modules whose training-mode forward couples the examples of a batch or is random: the
# Hessian is still defined, but it is not the one users expect (nor deterministic).
_TRAIN_MODE_TYPES: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,
                                                  nn.modules.dropout._DropoutNd)
MODES = ("auto", "graph", "functional")


def _as_batches(data: Batch | Iterable[Batch]) -> list[Batch]:
    """One ``(inputs, targets)`` pair, or an iterable of them (list, DataLoader) -> list."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor):
        return [data]
    batches = [tuple(b) for b in data]
    if not batches:
        raise ValueError("data is empty: pass an (inputs, targets) batch or a non-empty "
                         "iterable of such batches")
    return batches  # type: ignore[return-value]


def _select(model: nn.Module, params: Sequence[str | Tensor] | None) -> list[str]:
    """Names of the selected parameters, in ``named_parameters()`` order."""
    named = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in named.items() if p.requires_grad]
    else:
        by_id = {id(p): n for n, p in named.items()}
        wanted = set()
        for p in params:
            name = p if isinstance(p, str) else by_id.get(id(p))
            if name not in named:
                raise ValueError(f"unknown parameter {p if isinstance(p, str) else 'tensor'!r}; "
                                 f"pass names from model.named_parameters(): {list(named)}")
            wanted.add(name)
        names = [n for n in named if n in wanted]
    if not names:
        raise ValueError("no parameters selected: the model has no trainable parameters; pass "
                         "params=[...] with names from model.named_parameters()")
    return names


class HessianOperator:
    """Hessian ``H = d^2 L / d theta^2`` of a loss over selected parameters, as an operator.

    ``L(theta) = sum_b (n_b / N) loss_fn(model(x_b; theta), y_b)`` over the batches in
    ``data`` (one batch, or a list / DataLoader), so with a mean-reduced ``loss_fn`` the
    operator is the Hessian of the mean loss over all ``N`` examples, whatever the batch sizes.

    ``matmat(V)`` for ``V`` of shape ``(P, K)`` returns ``H V`` (``(P, K)``), in one of two modes:

    - ``"graph"`` (reverse-over-reverse, PyHessian's scheme): build
      ``g = autograd.grad(L_b, theta, create_graph=True)`` once per batch, then one plain
      double-backward per vector. Cost: one forward + backward to build, then ~2 backward
      passes per vector. The graph of a batch is cached between calls while the operator has
      at most ``cache_batches`` batches and the weights are unchanged (any in-place update,
      e.g. an optimizer step, rebuilds it); with more batches each graph lives only while its
      batch is used, so memory is one batch's graph (~2-3x its activations) at a time.
    - ``"functional"`` (forward-over-reverse): ``H v = jvp(grad(L), (theta,), (v,))`` vmapped
      over the ``K`` vectors (``chunk_size`` at a time); recomputes forward + backward on every
      call, keeps nothing; memory grows with the chunk.

    ``"auto"`` (default) uses ``"graph"`` for one vector per call (Lanczos, power iteration:
    it saves the primal passes) and, for blocks of vectors, ``"graph"`` on the CPU when one
    forward of the batch costs at least ``LOOP_MIN_FLOPS`` (0.5 GFLOP, counted once per batch
    in the Linear/Conv layers: faster than vmapped on the MNIST CNN of
    ``benchmarks/curvature.py``) and ``"functional"`` otherwise (faster on its MLP and on small
    nets, where a loop pays autograd's per-op overhead once per vector; on CUDA, the
    vmapped jvp turns ``K`` vectors into the wide batched matmuls a GPU needs, not measured
    here). Both modes agree to rounding.

    For the trace of a piecewise-linear network, :func:`exact_trace` needs no vectors at all.

    Args:
        model: the network; its parameters are read at every call (so it tracks training).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (e.g. ``F.cross_entropy``).
        data: ``(inputs, targets)`` or an iterable of such batches.
        params: parameter names or tensors to differentiate (default: all trainable), e.g.
            ``["fc2.weight", "fc2.bias"]`` for the last layer; the others are held fixed.
        eval_mode: run the model in eval mode while computing (restores the mode afterwards).
            Required when the model has BatchNorm or Dropout in training mode.
        chunk_size: vectors per vmapped pass in functional mode (``None``: all at once).
        mode: ``"auto"``, ``"graph"`` or ``"functional"`` (see above).
        cache_batches: in graph mode, keep the graphs between calls when the operator has at
            most this many batches (``0``: never keep them).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> op = HessianOperator(net, nn.functional.cross_entropy, (x, y))
        >>> op.matmat(torch.randn(op.dim, 5)).shape
        torch.Size([26, 5])
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Batch | Iterable[Batch],
                 params: Sequence[str | Tensor] | None = None, *, eval_mode: bool = False,
                 chunk_size: int | None = None, mode: str = "auto",
                 cache_batches: int = 1) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if cache_batches < 0:
            raise ValueError(f"cache_batches must be >= 0 (0: never cache), got {cache_batches}")
        self.model, self.loss_fn, self.eval_mode = model, loss_fn, eval_mode
        self.mode = mode
        self.cache_batches = cache_batches
        self._graphs: dict[int, GradGraph] = {}
        self._loop_choice: dict[int, bool] = {}  # batch index -> graph mode for blocks?
        self._key: Any = None
        self.batches = _as_batches(data)
        self.names = _select(model, params)
        named = dict(model.named_parameters())
        self.shapes = [named[n].shape for n in self.names]
        self.numels = [named[n].numel() for n in self.names]
        self.dim = sum(self.numels)
        self.dtype, self.device = named[self.names[0]].dtype, named[self.names[0]].device
        self.chunk_size = chunk_size
        if not eval_mode:
            self._refuse_train_mode()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def _refuse_train_mode(self) -> None:
        bad = [name or type(self.model).__name__ for name, m in self.model.named_modules()
               if isinstance(m, _TRAIN_MODE_TYPES) and m.training]
        if bad:
            raise ValueError(
                f"modules {bad} are in training mode: BatchNorm couples the examples of a batch "
                "(and Dropout is random), so the Hessian is not the one you expect; call "
                "model.eval() first or pass eval_mode=True")

    def flatten(self, tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """``{name: tensor}`` (or a list in ``names`` order) -> flat vector ``(P,)``."""
        parts = [tensors[n] for n in self.names] if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in parts])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Flat ``(P,)`` vector -> ``{name: tensor}`` with the parameters' shapes."""
        parts = torch.split(vec, self.numels)
        return {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape ``(P,)``."""
        return self.matmat(v.reshape(-1, 1)).reshape(-1)

    def matmat(self, V: Tensor) -> Tensor:
        """``H V`` for ``V`` of shape ``(P, K)``: all ``K`` vectors in one vmapped pass."""
        if V.ndim != 2 or V.shape[0] != self.dim:
            raise ValueError(f"expected V of shape ({self.dim}, K), got {tuple(V.shape)}; "
                             "use matvec for a single vector")
        return self._accumulate(self._batch_matmat, V.to(device=self.device, dtype=self.dtype))

    def clear_cache(self) -> None:
        """Drop the cached gradient graphs (graph mode) to free their memory now."""
        self._graphs.clear()
        self._key = None

    def _accumulate(self, per_batch: Callable[[int, Any, Tensor, Tensor], Tensor],
                    V: Tensor) -> Tensor:
        """``sum_b (n_b / N) per_batch(b, x_b, y_b, V)``, in eval mode if asked."""
        modes = {m: m.training for m in self.model.modules()}
        if self.eval_mode:
            self.model.eval()
        key = (weights_key(self.model), tuple(m.training for m in self.model.modules()))
        if key != self._key:  # weights or modes changed since the graphs were built
            self.clear_cache()
            self._key = key
        try:
            total = sum(len(y) for _, y in self.batches)
            out = None
            for b, (x, y) in enumerate(self.batches):
                part = per_batch(b, x, y, V)
                part = part if len(y) == total else (len(y) / total) * part
                out = part if out is None else out + part
        finally:
            for m, mode in modes.items():
                m.training = mode
        return out  # type: ignore[return-value]

    def _loss_of(self, x: Any, y: Tensor) -> tuple[Callable[..., Tensor], tuple[Tensor, ...]]:
        """The batch loss as a function of the selected parameters, and their values."""
        named = dict(self.model.named_parameters())
        frozen = {n: t.detach() for n, t in named.items() if n not in self.names}
        frozen.update(self.model.named_buffers())

        def loss(*ps: Tensor) -> Tensor:
            full = {**frozen, **dict(zip(self.names, ps))}
            return self.loss_fn(functional_call(self.model, full, (x,)), y)

        return loss, tuple(named[n].detach() for n in self.names)

    def _tangents(self, v: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view(s) for t, s in zip(torch.split(v, self.numels), self.shapes))

    def _batch_matmat(self, b: int, x: Any, y: Tensor, V: Tensor) -> Tensor:
        if self.mode == "auto":
            use_graph = V.shape[1] == 1 or (self.device.type == "cpu" and self._loop_pays(b, x))
        else:
            use_graph = self.mode == "graph"
        return self._graph_matmat(b, x, y, V) if use_graph else self._functional_matmat(x, y, V)

    def _loop_pays(self, b: int, x: Any) -> bool:
        """Is batch ``b`` large enough for a loop of double-backwards? (once per batch)"""
        if b not in self._loop_choice:
            self._loop_choice[b] = forward_flops(self.model, x) >= LOOP_MIN_FLOPS
        return self._loop_choice[b]

    def _graph_matmat(self, b: int, x: Any, y: Tensor, V: Tensor) -> Tensor:
        graph = self._graphs.get(b)
        if graph is None:
            graph = GradGraph(self.model, self.loss_fn, x, y, self.names)
            if len(self.batches) <= self.cache_batches:
                self._graphs[b] = graph
        rows = [torch.cat([h.reshape(-1) for h in graph.hvp(list(self._tangents(v)))])
                for v in V.T.contiguous()]  # K x (P,); V.T is contiguous for our own vectors
        return torch.stack(rows).T  # (P, K), a view of (K, P): no strided copy

    def _functional_matmat(self, x: Any, y: Tensor, V: Tensor) -> Tensor:
        loss, theta = self._loss_of(x, y)
        grad_fn = grad(loss, argnums=tuple(range(len(theta))))

        def hvp(v: Tensor) -> Tensor:
            hv = jvp(grad_fn, theta, self._tangents(v))[1]
            return torch.cat([h.reshape(-1) for h in hv])

        if V.shape[1] == 1:  # one vector (Lanczos, power iteration): skip vmap's batching rules
            return hvp(V[:, 0])[:, None]
        return vmap(hvp, chunk_size=self.chunk_size)(V.T).T  # (P, K)

    def to_dense(self) -> Tensor:
        """The explicit ``(P, P)`` matrix (``P`` mat-vecs; for small nets and tests)."""
        return self.matmat(torch.eye(self.dim, dtype=self.dtype, device=self.device))

    def to_scipy(self) -> LinearOperator:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out) for SciPy solvers."""

        return as_square(self).to_scipy()


def dense_hessian(model: nn.Module, loss_fn: LossFn, batch: Batch,
                  params: Sequence[str | Tensor] | None = None) -> Tensor:
    """Slow reference: the ``(P, P)`` Hessian by ``torch.func.hessian``, same flattening.

    Use in float64 on tiny nets to check ``HessianOperator``.
    """
    names = _select(model, params)
    named = dict(model.named_parameters())
    frozen = {n: t.detach() for n, t in named.items() if n not in names}
    frozen.update(model.named_buffers())
    numels = [named[n].numel() for n in names]
    shapes = [named[n].shape for n in names]
    x, y = batch

    def loss(flat: Tensor) -> Tensor:
        parts = {n: t.view(s) for n, t, s in zip(names, torch.split(flat, numels), shapes)}
        return loss_fn(functional_call(model, {**frozen, **parts}, (x,)), y)

    theta = torch.cat([named[n].detach().reshape(-1) for n in names])
    return torch.func.hessian(loss)(theta)
