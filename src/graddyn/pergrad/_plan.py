"""How each captured parameter's per-example gradients are computed, decided once per model
structure and reused while the structure stays the same.

1. *Rule calls*: recorded calls of modules with a closed-form rule (``_rules``) that accepts
   the call. The graph walk (``_walk``) jumps past them; every captured parameter it still
   reaches is *stray*: used where no rule serves it.
2. The layout check (``_layout``) establishes, from two backward passes, where the examples lie in
   each recorded output and in the tensors just above the stray uses. A rule call whose output
   is not per-example in the way its rule needs (shared positions, coupled statistics, an
   unbatched call, a loss that mixes examples) is *demoted*: the walk then goes through it
   and its parameters become stray too. Repeat until stable.
3. For the stray parameters, the *sources* of the exact path (``_local``): from each stray
   use, upwards, the nearest tensors whose gradient rows are per-example; the losses at the
   latest.

The resulting :class:`Plan` refers to the graph of later steps by position (call index,
walk order), which is why it is cached under a fingerprint of that graph's structure.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ._errors import CaptureError
from ._grads import NOT_FROM_CAPTURE
from ._layout import Layout, check_seeds, find_layout
from ._record import Call, ekey
from ._walk import Walk, walk

Node = object
Edge = tuple  # (autograd node, output nr)
MAX_CHECK_ROUNDS = 4
MAX_UPWARD_EDGES = 512  # per analysis; beyond it the exact path starts higher (slower, exact)


@dataclass(frozen=True)
class SourceRef:
    """A source of the exact path: an output of a recorded call (``"call"``, i = call index,
    j = output index), a node of the final walk (``"node"``, i = walk position, j = output
    nr) or the losses (``"losses"``)."""

    kind: str
    layout: Layout
    i: int = 0
    j: int = 0


@dataclass
class Book:
    """A validated book-keeping pass (``_local.book``): its sources, where the examples lie at
    each reduction and in each whole arrival at a key (a parameter id, or ("call", i) for
    the output of call i), and the keys whose per-example result it serves."""

    sources: list[SourceRef]
    layouts: list[Layout | None]
    final: dict[object, list[Layout]]
    keys: set
    targets: frozenset[int] = frozenset()  # the graph's parameter targets, as validated
    stops: tuple[int, ...] = ()  # the graph's stop calls, as validated


@dataclass
class Plan:
    rules: list[tuple[int, list]]  # active rule calls: (call index, layout of each output)
    exact: dict[int, str]  # id(param) -> why it takes the (vmapped) exact path
    sources: list[SourceRef] = field(default_factory=list)  # of the stray parameters
    internal: dict[int, list[int]] = field(default_factory=dict)  # id(param) -> rule calls
    jumps: tuple[int, ...] = ()  # the rule calls the final walk jumps past
    book_params: Book | None = None  # stray parameters served by book-keeping
    book_calls: Book | None = None  # rule calls whose output is shared by the examples


def jumps_of(calls: list[Call], active: set[int] | list[int]) -> dict[Node, list[Edge]]:
    """Walk jumps of the given rule calls: each output node -> the call's input edges."""
    return {e.node: [ekey(x) for x in calls[i].in_edges] for i in active for e in calls[i].edges}


def candidate_rules(calls: list[Call], mode: str = "loss") -> list[int]:
    """Calls a rule may serve: a rule, captured own parameters, one output (or a rule that
    reads several, in mode 'loss'), ``applies``."""
    out = []
    for i, c in enumerate(calls):
        r = c.rule
        outputs_ok = len(c.outputs) == 1 or (r is not None and r.accepts is not None
                                             and mode == "loss")
        if r is not None and c.wanted and outputs_ok and (
                r.applies is None or r.applies(c.module, c.args, c.kwargs)):
            out.append(i)
    return out


def layouts_of(call: Call, layout_check: LayoutCheck) -> list:
    return [layout_check.layout.get(ekey(e)) for e in call.edges]


def acceptable(call: Call, layouts: list) -> bool:
    """Can the call's rule read example n's gradient from its outputs' layouts?"""
    if call.rule.accepts is not None:
        return bool(call.rule.accepts(call.module, layouts))
    lay = layouts[0]
    if lay == "unused":
        return True
    if not isinstance(lay, Layout):
        return False
    x = call.args[0] if call.args and isinstance(call.args[0], Tensor) else None
    if x is None:
        return False
    if call.rule.batch_of(call.module) == "first":  # the rule's ``applies`` checks its inputs
        return lay.is_first
    out = call.outputs[0]
    return (lay.dim < out.ndim - 1 and lay.dim < x.dim()
            and x.shape[lay.dim] == out.shape[lay.dim])


class LayoutCheck:
    """Runs the layout check on batches of edges and keeps what it found (layouts, and the gradient
    for the seed of ones, which the engine reuses as its own output gradient)."""

    def __init__(self, losses: Tensor, scale: float) -> None:
        self.losses, self.scale = losses, scale
        self.b = losses.shape[0]
        self.v = check_seeds(self.b, losses.dtype, losses.device)
        self.layout: dict[Edge, Layout | str | None] = {}
        self.grad: dict[Edge, Tensor | None] = {}

    def seed_grad(self, e: Edge, lay: Layout | None = None) -> Tensor:
        """The check's gradient of edge ``e`` for the seed of ones, or (``lay`` given) for the
        seed ``v``: the same gradient scaled by ``v_n`` on example n's slice."""
        if e[0] is self.losses.grad_fn and e[1] == self.losses.output_nr:
            g = torch.full_like(self.losses, self.scale)
        else:
            g = self.grad[e]
        if lay is None:
            return g
        shape = [1] * g.ndim
        shape[lay.dim] = g.shape[lay.dim]
        return g * self.v[lay.row_example(self.b, g.device)].reshape(shape).to(g.dtype)

    def run(self, edges: list[Edge]) -> None:
        edges = [e for e in dict.fromkeys(edges) if e not in self.layout]
        if not edges:
            return
        from torch.autograd.graph import GradientEdge

        ge = [GradientEdge(*e) for e in edges]
        ones = torch.full_like(self.losses, self.scale)
        vs = self.v.reshape(-1, *[1] * (self.losses.ndim - 1)) * self.scale
        g1 = torch.autograd.grad(self.losses, ge, ones, retain_graph=True, allow_unused=True)
        gv = torch.autograd.grad(self.losses, ge, vs.expand_as(self.losses).to(ones.dtype),
                                 retain_graph=True, allow_unused=True)
        for e, a, c in zip(edges, g1, gv):
            self.layout[e] = find_layout(a, c, self.v)
            self.grad[e] = a


def _upward(w: Walk, starts: list[Node], stop: set[Node], limit: int) -> list[Edge]:
    """Edges above the nodes ``starts`` up to (including) nodes in ``stop``."""
    out: list[Edge] = []
    seen: set[Node] = set()
    todo = list(starts)
    while todo and len(out) < limit:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        for parent, nr in w.parents.get(node, ()):
            out.append((node, nr))
            if node not in stop:
                todo.append(parent)
    return out


def _consumers(w: Walk, params: set[int]) -> list[Node]:
    return [node for pid in params for node, _ in w.stray.get(pid, ())]


def _starts(w: Walk, nodes: list[Node], root: Edge) -> list[Edge]:
    """The edges out of ``nodes`` that their consumers read (the root's own edge for it)."""
    out = [root for n in nodes if n is root[0]]
    return out + [(n, nr) for n in nodes for _, nr in w.parents.get(n, ())]


def frontier(w: Walk, starts: list[Edge], layout_check: LayoutCheck, root: Edge
             ) -> tuple[dict[Edge, Layout], set[Edge]]:
    """The lowest per-example edges at or above ``starts`` on every path up to the losses
    ({edge: layout}), and the edges met on the way that were never checked."""
    sources: dict[Edge, Layout] = {}
    missing: set[Edge] = set()
    seen: set[Edge] = set()
    todo = list(starts)
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        if e == root:
            sources[e] = Layout(0)
            continue
        lay = layout_check.layout.get(e, "missing")
        if lay == "unused":
            continue
        if isinstance(lay, Layout):
            sources[e] = lay
            continue
        if lay == "missing":
            missing.add(e)
        node, nr = e
        for parent, pnr in w.parents.get(node, ()):
            if pnr == nr:
                todo.extend(_starts(w, [parent], root))
    return sources, missing


def _converge(calls: list[Call], root: Edge, layout_check: LayoutCheck, captured: dict[int, int],
              active: set[int], extra: list[int], kept: frozenset[int] = frozenset()
              ) -> tuple[Walk, set[int]]:
    """Demote rule calls until every active one reads per-example output gradients; check
    the edges the frontiers of the stray uses (and above the outputs of the calls ``extra``)
    need. Calls in ``kept`` (book-kept) are jumped and never demoted."""
    out_nodes = {e.node for c in calls for e in c.edges}
    rounds = 0
    while True:
        w = walk(root[0], jumps_of(calls, active | kept), captured, parents=True)
        todo = [ekey(e) for c in calls for e in c.edges]
        todo += _upward(w, _consumers(w, set(w.stray)), out_nodes, MAX_UPWARD_EDGES)
        layout_check.run(todo)
        demote = {i for i in active if not acceptable(calls[i], layouts_of(calls[i], layout_check))}
        if demote:
            active = active - demote
            continue
        starts = _starts(w, _consumers(w, set(w.stray)), root)
        starts += [ekey(calls[i].edges[0]) for i in extra]
        _, missing = frontier(w, starts, layout_check, root)
        if missing and rounds < MAX_CHECK_ROUNDS:
            rounds += 1
            layout_check.run(list(missing))
            continue
        return w, active


def _close(a: Tensor, b: Tensor) -> bool:
    tol = {torch.float64: 1e-6, torch.float32: 1e-4}.get(b.dtype, 5e-2)  # a wrong split: O(1)
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1e-30)


def _bookkeeping(sources: dict[Edge, Layout], layout_check: LayoutCheck, calls: list[Call],
                 targets: set[int], stops: list[int], internal: dict[int, set[Node]],
                 params: dict[int, Tensor]) -> tuple[list, dict, set]:
    """Learn a book-keeping pass from ``sources`` to ``targets`` (param ids) and the outputs
    of the calls ``stops``, and check it against the exact path on this step: (layouts,
    final, keys it serves); nothing if it cannot separate the examples."""
    from ._local import (
        LocalGraph,
        NotSeparable,
        book,
        edge_source,
        learn_book,
        local_grads,
        losses_source,
    )

    srcs = list(sources)
    stop_edge = {ekey(calls[i].edges[0]): i for i in stops}
    shapes = {**{pid: tuple(params[pid].shape) for pid in targets},
              **{e: tuple(calls[i].outputs[0].shape) for e, i in stop_edge.items()}}
    graph = LocalGraph(srcs, targets, internal, set(stop_edge))
    g1 = [layout_check.seed_grad(e) for e in srcs]
    gv = [layout_check.seed_grad(e, sources[e]) for e in srcs]
    try:
        layouts, final = learn_book(graph, g1, gv, layout_check.v, shapes)
        got = book(graph, g1, layouts, final, layout_check.b, shapes)
    except NotSeparable:
        return [], {}, set()
    exact_src = [losses_source(layout_check.losses, layout_check.scale, layout_check.b)
                 if e[0] is layout_check.losses.grad_fn and e[1] == layout_check.losses.output_nr
                 else edge_source(e, g, sources[e], layout_check.b, 1) for e, g in zip(srcs, g1)]
    exact = local_grads(exact_src, {p: params[p] for p in targets}, internal, layout_check.b,
                        {e: shapes[e] for e in stop_edge})
    keys = {k for k in got if k in exact and _close(got[k], exact[k])}

    def name(k: object) -> object:
        return ("call", stop_edge[k]) if k in stop_edge else k

    return layouts, {name(k): v for k, v in final.items()}, {name(k) for k in keys}


def analyse(calls: list[Call], losses: Tensor, scale: float, captured: dict[int, int],
            reason: Callable[[int, set[int], set[int]], str], params: dict[int, Tensor],
            bookkeep: bool = True) -> tuple[Plan, LayoutCheck, Walk]:
    """The plan for this step's graph (see the module docstring), the layout_check (whose gradients
    for the seed of ones the engine reuses) and the final walk (for node positions)."""
    from ._record import edge_of

    root = ekey(edge_of(losses))
    layout_check = LayoutCheck(losses, scale)
    cand = candidate_rules(calls, "loss" if bookkeep else "output")
    w, active = _converge(calls, root, layout_check, captured, set(cand), [])
    demoted = set(cand) - active
    book_calls = None
    eligible = sorted(i for i in demoted if calls[i].rule.batch_of(calls[i].module) == "leading"
                      and len(calls[i].outputs) == 1)
    if bookkeep and eligible:
        w, _ = _converge(calls, root, layout_check, captured, active, eligible)
        starts = [ekey(calls[i].edges[0]) for i in eligible]
        call_sources, _ = frontier(w, starts, layout_check, root)
        layouts, final, keys = _bookkeeping(call_sources, layout_check, calls, set(), eligible, {},
                                            params)
        kept = frozenset(i for _, i in keys)
        if kept:
            w, active = _converge(calls, root, layout_check, captured, active, [], kept)
            book_calls = Book(_refs(call_sources, root, calls, w), layouts, final, set(keys),
                              frozenset(), tuple(eligible))
    kept_calls = {i for _, i in book_calls.keys} if book_calls else set()
    stray = set(w.stray)
    jumps = active | kept_calls
    internal_idx = {pid: [i for i in sorted(jumps) if _owns(calls[i], pid)] for pid in stray}
    sources, _ = frontier(w, _starts(w, _consumers(w, stray), root), layout_check, root)
    book_params = None
    if bookkeep and stray:
        internal = {pid: set().union(*(internal_nodes(calls[i]) for i in idx))
                    for pid, idx in internal_idx.items()}
        layouts, final, keys = _bookkeeping(sources, layout_check, calls, stray, [], internal,
                                            params)
        if keys:
            book_params = Book(_refs(sources, root, calls, w), layouts, final, keys,
                               frozenset(stray))
    served = book_params.keys if book_params else set()
    rules = [(i, layouts_of(calls[i], layout_check)) for i in sorted(active)]
    exact = {pid: reason(pid, active, demoted - kept_calls)
             for pid in sorted(stray - served, key=captured.get)}
    if all(lay == "unused" for _, lays in rules for lay in lays) and not (
            exact or kept_calls or served):
        raise CaptureError(NOT_FROM_CAPTURE)
    if book_calls:  # the node positions of its sources in the final walk
        book_calls.sources = _refs(call_sources, root, calls, w)
    plan = Plan(rules, exact, _refs(sources, root, calls, w),
                {k: v for k, v in internal_idx.items() if v}, tuple(sorted(jumps)),
                book_params=book_params, book_calls=book_calls)
    return plan, layout_check, w


def _refs(sources: dict[Edge, Layout], root: Edge, calls: list[Call], w: Walk
          ) -> list[SourceRef]:
    call_edge = {ekey(e): (i, k) for i, c in enumerate(calls) for k, e in enumerate(c.edges)}
    refs = []
    for e, lay in sources.items():
        if e == root:
            refs.append(SourceRef("losses", lay))
        elif e in call_edge:
            refs.append(SourceRef("call", lay, *call_edge[e]))
        else:
            refs.append(SourceRef("node", lay, w.index_of(e[0]), e[1]))
    return refs


def internal_nodes(c: Call) -> set[object]:
    """Autograd nodes inside a rule call: between its output node and its inputs."""
    stop = {e.node for e in c.in_edges}
    out, todo = set(), [e.node for e in c.edges]
    while todo:
        node = todo.pop()
        if node is None or node in out or node in stop:
            continue
        out.add(node)
        todo.extend(child for child, _ in node.next_functions)
    return out


def _owns(call: Call, pid: int) -> bool:
    return any(id(call.module._parameters.get(a)) == pid for a in call.wanted)
