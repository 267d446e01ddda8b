"""The exact path: per-example gradients by batched vector-Jacobian products of the recorded
graph, run from the nearest per-example tensors down to the parameters that need them.

For a parameter theta used where no closed-form rule serves it (a module without a rule, a
tied head ``h @ emb.weight.T``, positions shared by all examples, a call whose output couples
the examples), example n's gradient is

    g_n = sum_s  (d L_n / d s) (d s / d theta)      over the *sources* s: tensors whose
                                                    gradient rows are per-example

where ``d L_n / d s`` is the engine's one output gradient of s restricted to example n's slice
(its :class:`~graddyn.pergrad._layout.Layout`) and the sum runs over every path from s down to
theta that meets no lower source (a gradient arriving at a source from above is dropped: the
source's own gradient already contains it, so each path is counted once, at its lowest
source). The losses themselves are always a valid source. The paths are evaluated by calling
the recorded autograd nodes themselves, ``vmap``-ed over examples: the graph of the captured
forward is reused as it is, so dropout keeps its masks, RNNs their fused kernels, and examples
any coupling they have (this computes the gradient of ``losses[n]`` of the batched forward).

Uses of theta that a rule already serves (the lookup of a tied embedding) are excluded: a
gradient reaching theta from a node inside such a rule call is dropped (``internal``).

Cost: B times the backward of the nodes between the sources and the parameters (only those);
memory: B times their gradients, bounded by processing examples in chunks.
"""

from __future__ import annotations

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


def _plan(sources: list[Source], targets: set[int], internal: dict[int, set[Node]]
          ) -> list[Node]:
    """Nodes on a path from a source to a target, parents before children."""
    blocked = {(s.node, s.nr) for s in sources}
    reach: dict[Node, bool] = {}
    post: list[Node] = []
    stack: list[tuple[Node, bool]] = [(s.node, False) for s in sources]
    while stack:
        node, done = stack.pop()
        if done:
            ok = False
            for child, nr in node.next_functions:
                if child is None or (child, nr) in blocked:
                    continue
                var = leaf_param(child)
                if var is not None:
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
                    and leaf_param(child) is None):
                stack.append((child, False))
    return [n for n in reversed(post) if reach[n]]


def local_grads(sources: list[Source], params: dict[int, Tensor],
                internal: dict[int, set[Node]], rows: int) -> dict[int, Tensor]:
    """Per-row gradients of the parameters ``params`` (id -> parameter) from ``sources``:
    dict id -> (rows, *param.shape) (zeros where no path exists)."""
    order = _plan(sources, set(params), internal)
    kept = set(order)
    blocked = {(s.node, s.nr) for s in sources}
    found: list[int] = []  # which targets the traced function returns, in order

    def run(*seeds: Tensor) -> tuple[Tensor, ...]:
        pending: dict[Node, list] = {}
        for src, s in zip(sources, seeds):
            slot = pending.setdefault(src.node, [None] * _n_out(src.node))
            slot[src.nr] = s if slot[src.nr] is None else slot[src.nr] + s
        acc: dict[int, Tensor] = {}
        for node in order:
            gin = pending.pop(node, None)
            if gin is None:
                continue
            if len(gin) > 1:  # some backward formulas need every output's gradient defined
                gin = [_zeros(node, i) if g is None else g for i, g in enumerate(gin)]
            res = node(*gin)
            res = (res,) if isinstance(res, Tensor) or res is None else res
            for (child, nr), g in zip(node.next_functions, res):
                if g is None or child is None or (child, nr) in blocked:
                    continue
                g = _as_input(child, nr, g)
                var = leaf_param(child)
                if var is not None:
                    pid = id(var)
                    if pid in params and node not in internal.get(pid, ()):
                        acc[pid] = g if pid not in acc else acc[pid] + g
                elif child in kept:
                    slot = pending.setdefault(child, [None] * _n_out(child))
                    slot[nr] = g if slot[nr] is None else slot[nr] + g
        found[:] = list(acc)
        return tuple(acc.values())

    per_row = max(1, sum(s.numel for s in sources))
    step = max(1, min(rows, CHUNK_ELEMENTS // per_row))
    parts: list[dict[int, Tensor]] = []
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        seeds = [s.seeds(r0, r1) for s in sources]
        parts.append(_batched(run, seeds, found, r1 - r0))
    out = {}
    for pid, p in params.items():
        chunks = [part.get(pid) for part in parts]
        out[pid] = torch.cat([p.new_zeros(r1 - r0, *p.shape) if c is None else c
                              for c, (r0, r1) in zip(chunks, _ranges(rows, step))]).detach()
    return out


def _ranges(rows: int, step: int) -> Iterable[tuple[int, int]]:
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def _batched(run: Callable, seeds: list[Tensor], found: list[int], n: int) -> dict[int, Tensor]:
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
    return {pid: torch.stack([r[k] for r in rows]) for k, pid in enumerate(found)} if rows else {}
