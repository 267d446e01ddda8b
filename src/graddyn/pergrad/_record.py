"""What a captured forward pass records: one :class:`Call` per call of a hooked module.

Hooked modules are those that own captured parameters and their ancestors (whose outputs
are per-example tensors close to the parameters the exact path serves). A call keeps its
inputs (detached: rules read them), its output tensors and, for each, the *gradient edge* at
call time, so an output later modified in place (``h += residual``) still gives the gradient
of the value the module returned; and the autograd nodes of its inputs, where the graph walk
jumps past a rule call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_map

from ._rules import Rule


def edge_of(t: Tensor) -> GradientEdge:
    """The gradient edge of ``t`` now (``get_gradient_edge`` without its Python overhead for
    the usual non-leaf case)."""
    fn = t.grad_fn
    return GradientEdge(fn, t.output_nr) if fn is not None else get_gradient_edge(t)


def ekey(e: GradientEdge) -> tuple:
    """(node, output nr): a hashable key of an edge."""
    return (e.node, e.output_nr)


@dataclass
class Call:
    """One recorded module call."""

    module: nn.Module
    args: tuple  # positional inputs, tensors detached
    kwargs: dict
    outputs: list[Tensor]  # output tensor leaves that require grad
    edges: list[GradientEdge]  # their gradient edges at call time
    in_edges: list[GradientEdge]  # gradient edges of the inputs that require grad, at call time
    ins: list[Tensor]  # tensor inputs, to detect in-place changes after the call
    versions: list[int]
    out_versions: list[int]  # of ``outputs`` at call time (a rule reading them checks)
    rule: Rule | None = None
    wanted: set[str] = field(default_factory=set)  # the module's own captured parameters
    tag: object = None  # what identifies the call across steps (default: id(module))


def record_call(m: nn.Module, args: tuple, kwargs: dict, output: object) -> Call | None:
    """The :class:`Call` of a forward hook's arguments, or None if no output needs a gradient
    (no graph, e.g. under ``torch.no_grad``)."""
    if isinstance(output, Tensor) and not kwargs and all(isinstance(a, Tensor) for a in args):
        if not output.requires_grad:  # fast path: tensors in, one out (most layers)
            return None
        outs, ins = [output], list(args)
        detached = (tuple(a.detach() for a in args), {})
    else:
        outs = [t for t in tree_flatten(output)[0] if isinstance(t, Tensor) and t.requires_grad]
        if not outs:
            return None
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        detached = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (args, kwargs))
    in_edges = [edge_of(t) for t in ins if t.requires_grad]
    return Call(m, detached[0], detached[1], outs, [edge_of(t) for t in outs], in_edges, ins,
                [t._version for t in ins], [t._version for t in outs])


def stale(calls: list[Call]) -> bool:
    """True if an input of a call was modified in place after it (rules read inputs)."""
    return any(t._version != v for c in calls for t, v in zip(c.ins, c.versions))


def orphaned(calls: list[Call]) -> Call | None:
    """A rule call with an output that is a view (an LSTM's batch-first ``out``) and was
    modified in place after the call, or None. Autograd then routes the gradient through the
    view's base (``CopySlices``) and no longer through the edge recorded at the call: the rule
    would read zeros there. (Other calls' outputs are only read where the graph walk reaches
    their edges, which an orphaned edge is not.)"""
    return next((c for c in calls if c.rule is not None and c.wanted
                 for t, v in zip(c.outputs, c.out_versions)
                 if t._version != v and t._is_view()), None)


def batch_pattern(calls: list[Call], b: int) -> tuple:
    """Which output dimensions have size ``b`` (or a multiple), per call: what a cached verdict
    about where the examples lie depends on besides the graph's structure."""
    def dims(t: Tensor) -> tuple[bool, ...]:
        return tuple(s > 0 and s % b == 0 for s in t.shape)

    return tuple((c.tag or id(c.module), tuple(map(dims, c.outputs))) for c in calls)

