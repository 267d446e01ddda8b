"""How each captured parameter's per-example gradients are computed, decided once per model
structure and reused while the structure stays the same.

1. *Rule calls*: recorded calls of modules with a closed-form rule (``_rules``) that accepts
   the call. The graph walk (``_walk``) jumps past them; every captured parameter it still
   reaches is *stray*: used where no rule serves it.
2. The probe (``_layout``) establishes, from two backward passes, where the examples lie in
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

from ._layout import Layout, find_layout, probe_seeds
from ._record import Call, ekey
from ._walk import Walk, walk

Node = object
Edge = tuple  # (autograd node, output nr)
MAX_PROBE_ROUNDS = 4
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
class Plan:
    rules: list[tuple[int, Layout | str]]  # active rule calls: (call index, output layout)
    exact: dict[int, str]  # id(param) -> why it takes the exact path
    sources: list[SourceRef] = field(default_factory=list)
    internal: dict[int, list[int]] = field(default_factory=dict)  # id(param) -> rule calls
    jumps: tuple[int, ...] = ()  # the rule calls the final walk jumps past
    demoted: bool = False


def jumps_of(calls: list[Call], active: set[int] | list[int]) -> dict[Node, list[Edge]]:
    """Walk jumps of the given rule calls: output node -> input edges."""
    return {calls[i].edges[0].node: [ekey(e) for e in calls[i].in_edges] for i in active}


def candidate_rules(calls: list[Call]) -> list[int]:
    """Calls a rule may serve: a rule, captured own parameters, one output, ``applies``."""
    out = []
    for i, c in enumerate(calls):
        r = c.rule
        if r is not None and c.wanted and len(c.outputs) == 1 and (
                r.applies is None or r.applies(c.module, c.args, c.kwargs)):
            out.append(i)
    return out


def acceptable(call: Call, lay: Layout | str | None, b: int) -> bool:
    """Can the call's rule read example n's gradient from the output layout ``lay``?"""
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


class Prober:
    """Runs the probe on batches of edges and keeps what it found (layouts, and the gradient
    for the seed of ones, which the engine reuses as its own output gradient)."""

    def __init__(self, losses: Tensor, scale: float) -> None:
        self.losses, self.scale = losses, scale
        self.b = losses.shape[0]
        self.v = probe_seeds(self.b, losses.dtype, losses.device)
        self.layout: dict[Edge, Layout | str | None] = {}
        self.grad: dict[Edge, Tensor | None] = {}

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


def frontier(w: Walk, params: set[int], prober: Prober, root: Edge
             ) -> tuple[dict[Edge, Layout], set[Edge]]:
    """Lowest per-example edges above every stray use of ``params`` ({edge: layout}), and the
    edges met on the way that were never probed."""
    sources: dict[Edge, Layout] = {}
    missing: set[Edge] = set()
    seen: set[Edge] = set()
    todo: list[Edge] = [(n, nr) for n in _consumers(w, params) for _, nr in w.parents.get(n, ())]
    todo += [root for n in _consumers(w, params) if n is root[0]]
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        seen.add(e)
        if e == root:
            sources[e] = Layout(0)
            continue
        lay = prober.layout.get(e, "missing")
        if lay == "unused":
            continue
        if isinstance(lay, Layout):
            sources[e] = lay
            continue
        if lay == "missing":
            missing.add(e)
        node, nr = e
        for parent, pnr in w.parents.get(node, ()):
            if pnr != nr:
                continue
            if parent is root[0]:
                todo.append(root)
            todo.extend((parent, q) for _, q in w.parents.get(parent, ()))
    return sources, missing


def analyse(calls: list[Call], losses: Tensor, scale: float, captured: dict[int, int],
            reason: Callable[[int, set[int], set[int]], str]) -> tuple[Plan, Prober, Walk]:
    """The plan for this step's graph (see the module docstring), the prober (whose gradients
    for the seed of ones the engine reuses) and the final walk (for node positions)."""
    from ._record import edge_of

    root = ekey(edge_of(losses))
    prober = Prober(losses, scale)
    cand = candidate_rules(calls)
    active = set(cand)
    out_nodes = {c.edges[k].node for c in calls for k in range(len(c.edges))}
    rounds = 0
    while True:
        w = walk(root[0], jumps_of(calls, active), captured, parents=True)
        stray = set(w.stray)
        todo = [ekey(e) for c in calls for e in c.edges]
        todo += _upward(w, _consumers(w, stray), out_nodes, MAX_UPWARD_EDGES)
        prober.run(todo)
        demote = {i for i in active if not acceptable(
            calls[i], prober.layout.get(ekey(calls[i].edges[0])), prober.b)}
        if demote:
            active -= demote
            continue
        sources, missing = frontier(w, stray, prober, root)
        if missing and rounds < MAX_PROBE_ROUNDS:
            rounds += 1
            prober.run(list(missing))
            continue
        break
    demoted = set(cand) - active
    rules = [(i, prober.layout[ekey(calls[i].edges[0])]) for i in sorted(active)]
    exact = {pid: reason(pid, active, demoted) for pid in sorted(stray, key=captured.get)}
    call_edge = {ekey(e): (i, k) for i, c in enumerate(calls) for k, e in enumerate(c.edges)}
    refs = []
    for e, lay in sources.items():
        if e == root:
            refs.append(SourceRef("losses", lay))
        elif e in call_edge:
            refs.append(SourceRef("call", lay, *call_edge[e]))
        else:
            refs.append(SourceRef("node", lay, w.index_of(e[0]), e[1]))
    internal = {pid: [i for i in sorted(active) if _owns(calls[i], pid)] for pid in stray}
    plan = Plan(rules, exact, refs, {k: v for k, v in internal.items() if v},
                tuple(sorted(active)), bool(demoted))
    return plan, prober, w


def _owns(call: Call, pid: int) -> bool:
    return any(id(call.module._parameters.get(a)) == pid for a in call.wanted)
