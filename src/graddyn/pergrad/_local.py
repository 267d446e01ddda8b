"""Per-example gradients of the parameters no closed-form rule serves, from the recorded graph.

For a parameter theta used where no rule serves it (a module without a rule, a tied head
``h @ emb.weight.T``, positions shared by all examples, a call whose output couples the
examples), example n's gradient is

    g_n = sum_s  (d L_n / d s) (d s / d theta)      over the *sources* s: tensors whose
                                                    gradient rows are per-example

where ``d L_n / d s`` is the engine's one output gradient of s restricted to example n's slice
(its :class:`~graddyn.pergrad._layout.Layout`) and the sum runs over every path from s down to
theta that meets no lower source (a gradient arriving at a source from above is dropped: the
source's own gradient already contains it, so each path is counted once, at its lowest
source). The losses themselves are always a valid source. The paths are evaluated by calling
the recorded autograd nodes themselves (``LocalGraph``): the graph of the captured forward is
reused as it is, so dropout keeps its masks, RNNs their fused kernels, and examples any
coupling they have (this computes the gradient of ``losses[n]`` of the batched forward).
Uses of theta that a rule already serves (the lookup of a tied embedding) are excluded: a
gradient reaching theta from a node inside such a rule call is dropped (``internal``).

Two ways to run the paths:

- the *exact path* (``local_grads``): one cotangent per example, ``vmap``-ed over examples:
  B times the backward of the nodes between the sources and theta, for any graph;
- *book-keeping* (``mode="book"``): one pass with the whole gradients. Where the autograd
  engine would sum a gradient over a broadcast of the examples (a norm's ``w * x_hat``, a
  layer scale, ``x + pos``, ``cls_token.expand(B, ...)``), the pass instead keeps example n's
  part apart (the examples' dimension there is found by the layout check's two seeds, ``trace``
  mode) and continues per example on the small tensors below. Cost: about one backward of
  the nodes in between. The plan uses it for a parameter (or a rule call whose output is
  shared by the examples) only where it reproduced the exact path on the first step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from ._walk import leaf_param

Node = object
CHUNK_ELEMENTS = 1 << 25
"""Largest number of seed elements processed at once (rows x source elements)."""


class NotSeparable(RuntimeError):
    """Book-keeping met a node fed by both whole and per-example gradients."""


@dataclass
class Source:
    """Gradient flowing into ``node`` at slot ``nr``; ``seeds(r0, r1)`` -> (r1 - r0, *shape),
    row r the cotangent of row r of the result (an example, or (example, output))."""

    node: Node
    nr: int
    numel: int
    seeds: Callable[[int, int], Tensor]


def _n_out(node: Node) -> int:
    return len(node._input_metadata)


def _meta_shape(child: Node, nr: int) -> tuple[int, ...]:
    return tuple(child._input_metadata[nr].shape)


def _zeros(node: Node, nr: int) -> Tensor:
    meta = node._input_metadata[nr]
    return torch.zeros(tuple(meta.shape), dtype=meta.dtype, device=meta.device)


def _as_input(child: Node, nr: int, g: Tensor) -> Tensor:
    """What the autograd engine does between nodes: reduce a broadcast gradient to the shape
    the next node expects and cast it to its dtype (a node called directly skips this)."""
    meta = child._input_metadata[nr]
    shape = tuple(meta.shape)
    if tuple(g.shape) != shape:
        g = g.sum_to_size(shape)
    return g if g.dtype == meta.dtype else g.to(meta.dtype)


def broadcast_layout_ok(lay: object, arrived: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    """Is the examples' dimension of a gradient of shape ``arrived`` one that the reduction
    to ``shape`` sums over (a broadcast of the examples), so per-example terms are separate?"""
    from ._layout import Layout

    if not isinstance(lay, Layout):
        return False
    extra = len(arrived) - len(shape)
    return lay.dim < extra or shape[lay.dim - extra] == 1


def per_example_reduce(g: Tensor, lay: object, b: int, shape: tuple[int, ...]) -> Tensor:
    """(B, *shape): example n's slice of ``g`` (examples along ``lay``) reduced to ``shape``
    the way autograd reduces a broadcast gradient."""
    t = g.movedim(lay.dim, 0)
    if lay.block == 1:
        t = t.unsqueeze(1)
    elif lay.minor:
        t = t.reshape(lay.block, b, *t.shape[1:]).transpose(0, 1)
    else:
        t = t.reshape(b, lay.block, *t.shape[1:])
    t = t.movedim(1, lay.dim + 1)  # (B, *arrived with the examples' dim of size block)
    extra = t.ndim - 1 - len(shape)
    if extra > 0:
        t = t.sum(dim=tuple(range(1, 1 + extra)))
    dims = [i + 1 for i, s in enumerate(shape) if s == 1 and t.shape[i + 1] != 1]
    return t.sum(dim=dims, keepdim=True) if dims else t


def _reaching(sources: list[tuple[Node, int]], targets: set[int], stops: set[tuple],
              internal: dict[int, set[Node]]) -> list[Node]:
    """Nodes on a path from a source to a target parameter or a stop edge, parents first."""
    blocked = set(sources)
    reach: dict[Node, bool] = {}
    post: list[Node] = []
    stack: list[tuple[Node, bool]] = [(n, False) for n, _ in sources]
    while stack:
        node, done = stack.pop()
        if done:
            ok = False
            for child, nr in node.next_functions:
                if child is None or (child, nr) in blocked:
                    continue
                var = leaf_param(child)
                if (child, nr) in stops:
                    ok = True
                elif var is not None:
                    ok = ok or (id(var) in targets and node not in internal.get(id(var), ()))
                elif reach.get(child):
                    ok = True
            reach[node] = ok
            post.append(node)
            continue
        if node in reach:
            continue
        reach[node] = False  # visiting
        stack.append((node, True))
        for child, nr in node.next_functions:
            if (child is not None and (child, nr) not in blocked and child not in reach
                    and (child, nr) not in stops and leaf_param(child) is None):
                stack.append((child, False))
    return [n for n in reversed(post) if reach[n]]


class _Each:
    """A gradient held per example: (B, *shape)."""

    __slots__ = ("t",)

    def __init__(self, t: Tensor) -> None:
        self.t = t


def _add(a: object, b: object) -> object:
    if a is None:
        return b
    if isinstance(a, _Each) != isinstance(b, _Each):
        raise NotSeparable("a node receives both whole and per-example gradients")
    return _Each(a.t + b.t) if isinstance(a, _Each) else a + b


class LocalGraph:
    """The recorded nodes between ``sources`` (edges (node, nr) whose gradient is given) and
    the target parameters ``targets`` (ids) or ``stops`` (edges), ready to run."""

    def __init__(self, sources: list[tuple[Node, int]], targets: set[int],
                 internal: dict[int, set[Node]], stops: set[tuple] = frozenset()) -> None:
        self.sources, self.targets, self.internal = list(sources), set(targets), internal
        self.stops = set(stops)
        self.order = _reaching(self.sources, self.targets, self.stops, internal)
        self.kept = set(self.order)
        self.blocked = set(self.sources)

    def run(self, seeds: list[Tensor], mode: str = "whole", layouts: list | None = None,
            b: int = 0) -> tuple[dict, dict, list]:
        """Propagate ``seeds`` (one per source) down to the targets and stops; key: id(param)
        or a stop edge. Returns (results, raw arrivals, reductions):

        - ``mode="whole"``: results[key] = its gradient, as autograd would accumulate it;
        - ``"trace"``: reductions = every gradient arriving where autograd sums it to a
          smaller shape, in order, unreduced; raw[key] = the arrivals at each key, unreduced;
        - ``"book"``: per-example propagation, ``layouts`` giving, for each reduction of a
          trace (in order), where the examples lie there (or None: reduce it whole);
          results[key] = per-example sums (an ``_Each``) and raw[key] = whole arrivals.
        """
        it = iter(layouts or [])
        pending: dict[Node, list] = {}
        for (node, nr), s in zip(self.sources, seeds):
            slot = pending.setdefault(node, [None] * _n_out(node))
            slot[nr] = _add(slot[nr], s)
        out: dict = {}
        raw: dict = {}
        reductions: list = []
        for node in self.order:
            gin = pending.pop(node, None)
            if gin is None:
                continue
            if (mode != "whole" and node.name() == "ExpandBackward0"
                    and not isinstance(gin[0], _Each)):  # an expand sums over what it copied
                res = (self._reduce(gin[0], tuple(node._saved_self_sym_sizes), gin[0].dtype,
                                    mode, it, b, reductions),)
            else:
                res = self._call(node, gin)
            for (child, nr), g in zip(node.next_functions, res):
                if g is None or child is None or (child, nr) in self.blocked:
                    continue
                var = leaf_param(child)
                key = (child, nr) if (child, nr) in self.stops else (
                    id(var) if var is not None else None)
                if var is not None and (key not in self.targets
                                        or node in self.internal.get(key, ())):
                    continue  # not wanted, or a use that the parameter's own rule serves
                if key is not None:
                    if isinstance(g, _Each):
                        out[key] = _add(out.get(key), self._arrive(child, nr, g, mode, it, b,
                                                                   reductions))
                    elif mode == "whole":
                        out[key] = _add(out.get(key), _as_input(child, nr, g))
                    else:
                        raw.setdefault(key, []).append(g)
                    continue
                if child in self.kept:
                    g = self._arrive(child, nr, g, mode, it, b, reductions)
                    slot = pending.setdefault(child, [None] * _n_out(child))
                    slot[nr] = _add(slot[nr], g)
        return out, raw, reductions

    @staticmethod
    def _call(node: Node, gin: list) -> tuple:
        each = [isinstance(g, _Each) for g in gin]
        if len(gin) > 1:  # some backward formulas need every output's gradient defined
            gin = [_zeros(node, i) if g is None else g for i, g in enumerate(gin)]
        if not any(each):
            res = node(*gin)
            return (res,) if isinstance(res, Tensor) or res is None else res
        if not all(e or g is None for e, g in zip(each, gin)) and any(
                not e and g is not None and bool(g.any()) for e, g in zip(each, gin)):
            raise NotSeparable("a node receives both whole and per-example gradients")
        args = [g.t if isinstance(g, _Each) else g for g in gin]
        nones: list[bool] = []

        def call(*a: Tensor) -> tuple[Tensor, ...]:  # vmap returns tensors only
            r = node(*a)
            r = (r,) if isinstance(r, Tensor) or r is None else r
            nones[:] = [x is None for x in r]
            return tuple(a[0].new_zeros(()) if x is None else x for x in r)

        res = vmap(call, in_dims=tuple(0 if e else None for e in each))(*args)
        return tuple(None if gone else _Each(r) for r, gone in zip(res, nones))

    @staticmethod
    def _arrive(child: Node, nr: int, g: object, mode: str, it: object, b: int,
                reductions: list) -> object:
        """``g`` as ``child`` expects it: reduced where the shapes differ (per example where
        the examples are a broadcast there, in ``book`` mode), cast to its dtype."""
        return LocalGraph._reduce(g, _meta_shape(child, nr), child._input_metadata[nr].dtype,
                                  mode, it, b, reductions)

    @staticmethod
    def _reduce(g: object, shape: tuple[int, ...], dtype: torch.dtype, mode: str, it: object,
                b: int, reductions: list) -> object:
        if isinstance(g, _Each):
            t = g.t if tuple(g.t.shape[1:]) == shape else vmap(
                lambda x: x.sum_to_size(shape))(g.t)
            return _Each(t if t.dtype == dtype else t.to(dtype))
        if tuple(g.shape) != shape:
            if mode == "trace":
                reductions.append(g)
            elif mode == "book":
                lay = next(it, None)
                if lay is not None and broadcast_layout_ok(lay, tuple(g.shape), shape):
                    return _Each(per_example_reduce(g, lay, b, shape).to(dtype))
            g = g.sum_to_size(shape)
        return g if g.dtype == dtype else g.to(dtype)


def learn_book(graph: LocalGraph, g1: list[Tensor], gv: list[Tensor], v: Tensor,
               shapes: dict) -> tuple[list, dict]:
    """Where the examples lie at each reduction (``trace``) and in each whole arrival at a
    key, from the gradients for the seeds 1 and ``v`` (see ``_layout``): the ``layouts``
    and ``final`` arguments of :func:`book`. Raises ``NotSeparable`` if a key's arrival keeps
    no broadcast of the examples."""
    from ._layout import Layout, find_layout

    b = v.numel()
    with torch.no_grad():
        r1, rv = graph.run(g1, "trace")[2], graph.run(gv, "trace")[2]
        red = [lay if isinstance(lay := find_layout(x, y, v), Layout) else None
               for x, y in zip(r1, rv)]
        raw1, rawv = graph.run(g1, "book", red, b)[1], graph.run(gv, "book", red, b)[1]
    final = {}
    for key, arrivals in raw1.items():  # a key whose arrivals keep no example apart: left out
        lays = [find_layout(x, y, v) for x, y in zip(arrivals, rawv.get(key, []))]
        if len(lays) == len(arrivals) and all(
                broadcast_layout_ok(lay, tuple(x.shape), shapes[key])
                for lay, x in zip(lays, arrivals)):
            final[key] = lays
    return red, final


def book(graph: LocalGraph, seeds: list[Tensor], layouts: list, final: dict, b: int,
         shapes: dict) -> dict:
    """Per-example results key -> (B, *shape) of one book-keeping pass (see the module
    docstring); ``layouts``, ``final``: from :func:`learn_book`."""
    with torch.no_grad():
        out, raw, _ = graph.run(seeds, "book", layouts, b)
    res = {k: v.t for k, v in out.items()}
    for key, arrivals in raw.items():
        lays = final.get(key)
        if lays is None or len(lays) != len(arrivals):
            res.pop(key, None)  # no per-example split there: not served by this pass
            continue
        for g, lay in zip(arrivals, lays):
            part = per_example_reduce(g, lay, b, shapes[key])
            res[key] = part if key not in res else res[key] + part
    return res


def local_grads(sources: list[Source], params: dict[int, Tensor],
                internal: dict[int, set[Node]], rows: int,
                stops: dict[tuple, tuple[int, ...]] | None = None) -> dict:
    """Per-row gradients of the parameters ``params`` (id -> parameter) and of the ``stops``
    (edge -> shape) from ``sources``: key -> (rows, *shape) (zeros where no path exists)."""
    stops = stops or {}
    graph = LocalGraph([(s.node, s.nr) for s in sources], set(params), internal, set(stops))
    found: list = []  # which keys the traced function returns, in order

    def run(*seeds: Tensor) -> tuple[Tensor, ...]:
        acc = graph.run(list(seeds))[0]
        found[:] = list(acc)
        return tuple(acc.values())

    per_row = max(1, sum(s.numel for s in sources))
    step = max(1, min(rows, CHUNK_ELEMENTS // per_row))
    parts: list[dict] = []
    for r0, r1 in _ranges(rows, step):
        parts.append(_batched(run, [s.seeds(r0, r1) for s in sources], found, r1 - r0))
    shapes = {**{pid: tuple(p.shape) for pid, p in params.items()}, **stops}
    like = next(iter(params.values()), None)
    out = {}
    for key, shape in shapes.items():
        chunks = []
        for part, (r0, r1) in zip(parts, _ranges(rows, step)):
            c = part.get(key)
            chunks.append(c if c is not None else torch.zeros(
                r1 - r0, *shape, dtype=like.dtype if like is not None else torch.float32,
                device=like.device if like is not None else None))
        out[key] = torch.cat(chunks).detach()
    return out


def losses_source(losses: Tensor, scale: float, rows: int) -> Source:
    """Row r: ``scale`` on entry r of the (flattened) losses."""
    shape = tuple(losses.shape)

    def seeds(r0: int, r1: int) -> Tensor:
        eye = torch.zeros(r1 - r0, rows, dtype=losses.dtype, device=losses.device)
        eye[torch.arange(r1 - r0), torch.arange(r0, r1)] = scale
        return eye.reshape(r1 - r0, *shape)

    return Source(losses.grad_fn, losses.output_nr, rows, seeds)


def edge_source(e: tuple, g: Tensor, lay: object, b: int, k: int) -> Source:
    """Row n (or n K + k): the gradient ``g`` of the edge restricted to example n's slice."""
    shape = tuple(g.shape) if k == 1 else tuple(g.shape[1:])
    mask = lay.masks(shape, b, g.device, g.dtype)  # (B, *shape)

    def seeds(r0: int, r1: int) -> Tensor:
        if k == 1:
            return g.unsqueeze(0) * mask[r0:r1]
        r = torch.arange(r0, r1, device=g.device)
        return g[r % k] * mask[r // k]

    return Source(e[0], e[1], math.prod(shape), seeds)


def _ranges(rows: int, step: int) -> Iterable[tuple[int, int]]:
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _batched(run: Callable, seeds: list[Tensor], found: list, n: int) -> dict:
    """``run`` vmapped over the rows of the seeds; a plain loop if some node cannot be
    vmapped (exact either way, the loop is slower)."""
    with warnings.catch_warnings():  # vmap's note on ops without batching rules: a slow path
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        try:
            res = vmap(run)(*seeds)
            return dict(zip(found, res))
        except (RuntimeError, NotImplementedError, ValueError):
            pass
    rows = [run(*[s[i] for s in seeds]) for i in range(n)]
    return {key: torch.stack([r[k] for r in rows]) for k, key in enumerate(found)} if rows else {}
