"""The one public registry of closed-form per-example gradient rules: module type -> rule.

A rule turns one recorded call of a module (its inputs and the gradient of the losses with
respect to its output, examples first) into per-example gradients of the module's own
parameters, dense ``(N, *param.shape)`` or factored as :class:`~graddyn.pergrad.Outer`
(``sum_t left (x) right``, whose inner products never form the gradients). The engine and
the curvature code both read rules from here; register your own layer's rule with
:func:`register_rule` (as Opacus' ``register_grad_sampler``):

>>> class Scale(nn.Module):                      # y = x * w, w of shape (D,)
...     def __init__(self, d): super().__init__(); self.w = nn.Parameter(torch.ones(d))
...     def forward(self, x): return x * self.w
>>> @register_rule(Scale, batch="leading")
... def scale_rule(module, call):               # call.grad, call.args[0]: (N, ..., D)
...     g, x = call.grad, call.args[0]
...     return [("w", (g * x).reshape(g.shape[0], -1, g.shape[-1]).sum(1))]   # (N, D)

Exact types only: a subclass may override ``forward``, so it is served by the exact path
(``_local``) unless registered itself. A module whose output does not keep the examples where
its rule expects them (``batch``), or whose ``applies`` refuses a call, is served by the exact
path too; a rule is never used where it could be wrong.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import Tensor, nn

from ._factors import Outer

Use = tuple[str, "Outer | Tensor"]


@dataclass
class RuleCall:
    """One recorded call as a rule sees it.

    ``grad``: d(sum of losses) / d(output) with the examples first, (N, ...) (row n is example
    n's own; for ``batch="leading"`` rules, examples grouped in blocks give (N, k, ...)).
    ``args``/``kwargs``: the call's inputs, detached; for ``batch="leading"`` rules ``args[0]``
    is rearranged like ``grad``. ``wanted``: the names of the module's own parameters to return.
    """

    args: tuple
    kwargs: dict
    grad: Tensor
    wanted: set[str] = field(default_factory=set)
    grads: list = field(default_factory=list)  # every output's gradient (``accepts`` rules)
    outputs: list = field(default_factory=list)  # ``accepts`` rules: every output, detached;
    # None where it was modified in place after the call


RuleFn = Callable[[nn.Module, RuleCall], Iterable[Use]]


@dataclass(frozen=True)
class Rule:
    """``fn(module, call)`` -> [(parameter name, dense (N, *shape) or Outer)], with

    ``batch``: ``"first"`` (the examples must be dimension 0 of the output and of
    ``args[0]``: convolutions, channel-first norms) or ``"leading"`` (any dimension before the
    trailing feature dimensions, moved to the front by the engine: Linear, Embedding,
    LayerNorm); or a function of the module returning one of them.
    ``applies(module, args, kwargs) -> bool``: False sends that call to the exact path.
    ``accepts(module, layouts) -> bool``: for a module with several outputs (an LSTM's
    ``out, (h_n, c_n)``): given where the examples lie in each output tensor, can the rule
    read them? Such a rule gets every output's gradient, untouched, in ``call.grads``.
    """

    fn: RuleFn
    batch: str | Callable[[nn.Module], str] = "first"
    applies: Callable[[nn.Module, tuple, dict], bool] | None = None
    accepts: Callable[[nn.Module, list], bool] | None = None

    def batch_of(self, module: nn.Module) -> str:
        return self.batch(module) if callable(self.batch) else self.batch


RULES: dict[type, Rule] = {}
_INTEGRATIONS = {"transformers": "graddyn.integrations.hf_rules"}
_loaded: set[str] = set()


def register_rule(module_type: type, fn: RuleFn | None = None, *, batch: str | Callable = "first",
                  applies: Callable | None = None, accepts: Callable | None = None) -> Callable:
    """Register ``fn`` as the closed-form rule of ``module_type`` (exact type); usable as a
    decorator. Replaces an earlier rule of the same type. See :class:`Rule` for the arguments
    and the module docstring for an example."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_rule needs an nn.Module subclass, got {module_type!r}")
    if not (batch in ("first", "leading") or callable(batch)):
        raise ValueError(f"batch must be 'first', 'leading' or a function of the module, "
                         f"got {batch!r}")

    def deco(f: RuleFn) -> RuleFn:
        RULES[module_type] = Rule(f, batch, applies, accepts)
        return f

    return deco(fn) if fn is not None else deco


def rule_for(module: nn.Module) -> Rule | None:
    """The rule of ``type(module)``; rules for third-party layers (Hugging Face's ``Conv1D``)
    are registered the first time a module of that library is looked up."""
    t = type(module)
    rule = RULES.get(t)
    if rule is None:
        lib = t.__module__.split(".", 1)[0]
        if lib in _INTEGRATIONS and lib not in _loaded:
            _loaded.add(lib)
            importlib.import_module(_INTEGRATIONS[lib])
            rule = RULES.get(t)
    return rule


def _register_builtin() -> None:
    from . import _rules_conv, _rules_linear, _rules_norm, _rules_rnn  # noqa: F401


_register_builtin()
