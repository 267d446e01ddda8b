"""Find captured parameters used outside the module calls that the backward plan serves.

The engine computes per-example gradients from recorded module calls (rule or fallback).
A captured parameter that also enters the loss through a plain tensor op outside those calls
(``h @ self.emb.weight.T``, ``F.linear(x, self.fc.weight)`` in a parent's forward) would have
that use's contribution silently dropped. This module finds every such use, exactly, by one
walk of the autograd graph before the backward pass:

- start at ``losses.grad_fn`` and follow ``next_functions``;
- at the output node of a planned *rule* call, jump straight to the call's input nodes (the
  module's internals use only its own parameters, which the rule serves);
- at the output node of a planned *fallback* call, walk inside with that call's parameters
  allowed (the torch.func vjp covers every use inside the call), and leave the call's scope
  again at its input nodes;
- an ``AccumulateGrad`` node whose ``.variable`` is a captured parameter not allowed in the
  current scope is a stray use.

Cost: one visit per autograd node outside rule calls (plus inside fallback calls); about a
microsecond of Python per node, e.g. ~10 nodes for an MLP, a few hundred for a transformer.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class PlannedCall:
    """One call of the backward plan: output/input tensors and the parameters it serves."""

    outputs: list[Tensor]
    inputs: list[Tensor]
    fallback: bool
    serves: frozenset[int] = frozenset()  # id(parameter) computed by this call


@dataclass
class _Scope:
    parent: int  # index of the enclosing scope (-1 for the outside)
    allowed: frozenset[int]  # parameter ids whose uses are covered here (chain union)
    exits: frozenset  # input nodes of the call: reaching one leaves the scope


def _leaf_param(node: object) -> int | None:
    var = getattr(node, "variable", None)  # only AccumulateGrad nodes have .variable
    return id(var) if isinstance(var, Tensor) else None


def stray_uses(losses: Tensor, calls: list[PlannedCall], captured: dict[int, str]) -> list[str]:
    """Names of captured parameters reached in the graph of ``losses`` outside planned calls.

    ``captured``: id(parameter) -> name. Returns names in ``captured`` order (empty if none).
    """
    jumps: dict[object, list[object]] = {}  # rule output node -> its input nodes
    enters: dict[object, list[int]] = {}  # fallback output node -> indices into ``calls``
    for i, c in enumerate(calls):
        ins = [t.grad_fn for t in c.inputs if t.grad_fn is not None]
        for o in c.outputs:
            node = o.grad_fn
            if node is None or node in ins:  # identity-like output: nothing to skip
                continue
            if c.fallback:  # hooks fire inner call first: outermost call goes first
                enters.setdefault(node, []).insert(0, i)
            else:
                jumps[node] = ins
    scopes = [_Scope(-1, frozenset(), frozenset())]
    scope_of_call: dict[tuple[int, int], int] = {}
    stray: set[int] = set()
    stack: list[tuple[object, int]] = [(losses.grad_fn, 0)]
    seen: set[tuple[object, int]] = set()
    while stack:
        node, s = stack.pop()
        if node is None or (node, s) in seen:
            continue
        seen.add((node, s))
        while node in scopes[s].exits:  # left the fallback call through one of its inputs
            s = scopes[s].parent
        pid = _leaf_param(node)
        if pid is not None:
            if pid in captured and pid not in scopes[s].allowed:
                stray.add(pid)
            continue
        for i in enters.get(node, ()):  # a module may return its child's output: enter
            s = _enter(scopes, scope_of_call, calls, i, s)  # the fallback scope(s) first
        if node in jumps:
            stack.extend((n, s) for n in jumps[node])
            continue
        stack.extend((n, s) for n, _ in node.next_functions)
    for c in calls:  # a captured parameter passed as a call's input is used outside too
        for t in c.inputs:
            if id(t) in captured and t.grad_fn is None and id(t) not in c.serves:
                stray.add(id(t))
    return [name for pid, name in captured.items() if pid in stray]


def _enter(scopes: list[_Scope], scope_of_call: dict[tuple[int, int], int],
           calls: list[PlannedCall], i: int, s: int) -> int:
    """Index of the scope of fallback call ``i`` entered from scope ``s`` (made once)."""
    if (i, s) not in scope_of_call:
        c = calls[i]
        exits = frozenset(t.grad_fn for t in c.inputs if t.grad_fn is not None)
        scopes.append(_Scope(s, scopes[s].allowed | c.serves, exits))
        scope_of_call[(i, s)] = len(scopes) - 1
    return scope_of_call[(i, s)]


def stray_message(names: list[str]) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:5]) + (" ..." if len(names) > 5 else "")
    return (
        f"captured parameter(s) {shown} are also used as plain tensors outside their own "
        "module's call (e.g. a tied LM head written `h @ self.emb.weight.T`, or "
        "`F.linear(x, self.fc.weight)` in a parent's forward while `self.fc` is also called). "
        "graddyn builds per-example gradients from module calls, so that use's share of the "
        "gradient would be silently missing. Fix: route every use through a module call (for "
        "a tied head: `self.head = nn.Linear(d, vocab, bias=False); self.head.weight = "
        "self.emb.weight`), or leave these parameters out with capture(model, params=[...])."
    )
