"""One walk of the autograd graph of the losses, outside the calls that closed-form rules serve.

Starting at the losses' node and following ``next_functions``, the walk jumps from the output
node of each *rule call* (a recorded module call whose rule gives its parameters' per-example
gradients) straight to the call's input nodes: a rule module uses no parameter but its own.
Every other node is visited. What it finds:

- ``stray``: captured parameters reached outside rule calls (a tied head written
  ``h @ self.emb.weight.T``, a layer-scale ``gamma * h`` in a parent's forward, a module
  without a rule, a rule call demoted because its output is not per-example), each with the
  nodes that consume it: their per-example gradients come from the exact path (``_local``);
- ``key``: a fingerprint of the visited structure, so a verdict cached for one step is
  reused only for a graph of the same shape;
- ``parents`` (on request): the consumers of each visited node, to search upwards for the
  nearest per-example tensors.

Cost: about a microsecond of Python per visited node (a few hundred for a transformer).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from ._errors import CaptureError

Node = object

REENTRANT_CHECKPOINT = (
    "the graph holds a reentrant activation checkpoint (torch.utils.checkpoint with "
    "use_reentrant=True): the checkpointed modules run without a graph in the forward pass, "
    "so their parameters' per-example gradients cannot be recorded. Fix: use_reentrant=False "
    "(Hugging Face: model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
    "{'use_reentrant': False})).")


@dataclass
class Walk:
    nodes: list[Node]  # visit order (deterministic for a given structure)
    stray: dict[int, list[tuple[Node, int]]]  # id(param) -> [(consumer node, input slot)]
    key: int
    parents: dict[Node, list[tuple[Node, int]]] | None = None  # child -> [(consumer, nr)]
    index: dict[Node, int] = field(default_factory=dict)

    def index_of(self, node: Node) -> int:
        if not self.index:
            self.index = {n: i for i, n in enumerate(self.nodes)}
        return self.index[node]


def leaf_param(node: Node) -> object:
    """The tensor an ``AccumulateGrad`` node accumulates into, else None."""
    return getattr(node, "variable", None)


def walk(root: Node, jumps: dict[Node, list[tuple[Node, int]]], captured: dict[int, int],
         parents: bool = False) -> Walk:
    """Visit the graph below ``root``; ``jumps``: rule-call output node -> its input edges
    (node, output nr); ``captured``: id(param) -> position (part of the fingerprint)."""
    order: list[Node] = []
    stray: dict[int, list[tuple[Node, int]]] = defaultdict(list)
    par: dict[Node, list[tuple[Node, int]]] | None = defaultdict(list) if parents else None
    sig: list[object] = []
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        name = node.name()
        if name == "CheckpointFunctionBackward":
            raise CaptureError(REENTRANT_CHECKPOINT)
        jump = jumps.get(node)
        sig.append(("J", name) if jump is not None else name)
        edges = ((c, nr, -1) for c, nr in jump) if jump is not None else (
            (c, nr, slot) for slot, (c, nr) in enumerate(node.next_functions))
        children = []
        for child, nr, slot in edges:  # slot -1: a parameter given as a rule call's input
            if child is None:
                continue
            var = leaf_param(child)
            if var is not None:
                pos = captured.get(id(var))
                if pos is not None:
                    stray[id(var)].append((node, slot))
                    sig.append(pos)
                continue
            children.append((child, nr))
        for child, nr in children:
            if par is not None:
                par[child].append((node, nr))
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return Walk(order, dict(stray), hash(tuple(sig)), par)
