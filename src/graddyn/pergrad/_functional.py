"""Rule calls for weights used functionally inside a module: ``nn.MultiheadAttention``.

``nn.MultiheadAttention`` never calls its projections as modules: its forward passes
``in_proj_weight`` (or row slices of it: the q / k / v blocks) and ``out_proj.weight`` to
``F.linear`` inside ``F.multi_head_attention_forward``. While such a module runs under a
capture, that function is redirected (a ``TorchFunctionMode`` active during the module's
forward only) to a copy of itself whose ``linear`` records each call as a *functional rule
call*: input, output and which rows of which parameter the weight is. The Linear rule then
serves it like any ``nn.Linear``; its output layouts (``(T, B, 3E)`` projections,
``(T B, E)`` before the output projection) are established by the probe. If the copy cannot
be made or a weight is not a plain row slice of a captured parameter, nothing is recorded and
those parameters take the exact path: slower, still exact.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._factors import Outer
from ._rules import Rule, RuleCall, Use
from ._rules_linear import linear_factors

_linear = torch._C._nn.linear
_RECORDERS: list[Callable[[Tensor, Tensor, Tensor | None, Tensor], None]] = []


def _recording_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = _linear(input, weight, bias)
    if _RECORDERS:
        _RECORDERS[-1](input, weight, bias, out)
    return out


def _with_recording_linear(fn: Callable, env: dict) -> Callable:
    return types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)


def _mha_copy() -> Callable | None:
    """``F.multi_head_attention_forward`` whose ``linear`` calls record (None if this torch's
    function is not the pure-Python one this relies on)."""
    fn = getattr(F, "multi_head_attention_forward", None)
    if not isinstance(fn, types.FunctionType):
        return None
    env = dict(F.__dict__)
    env["linear"] = _recording_linear
    env["has_torch_function"] = lambda *_: False  # the copy is the handler: do not re-dispatch
    for name in ("_in_projection_packed", "_in_projection"):
        if isinstance(env.get(name), types.FunctionType):
            env[name] = _with_recording_linear(env[name], env)
    return _with_recording_linear(fn, env)


_MHA = _mha_copy()


class _Redirect(TorchFunctionMode):
    """Send ``F.multi_head_attention_forward`` to the recording copy; all else unchanged."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # noqa: ANN001
        if func is F.multi_head_attention_forward and _MHA is not None:
            func = _MHA
        return func(*args, **(kwargs or {}))


class FunctionalLinear:
    """A functional ``F.linear(x, W[r0:r1], b[r0:r1])`` on captured parameters, as the Linear
    rule sees it (``_parameters`` maps 'weight'/'bias' to the parameters)."""

    def __init__(self, weight: nn.Parameter, rows: tuple[int, int], bias: nn.Parameter | None,
                 bias_rows: tuple[int, int] | None) -> None:
        self._parameters = {"weight": weight}
        if bias is not None:
            self._parameters["bias"] = bias
        self.rows, self.bias_rows = rows, bias_rows
        self.training = False


def _rows_of(t: Tensor | None, captured: dict[int, nn.Parameter]
             ) -> tuple[nn.Parameter, tuple[int, int]] | None:
    """(parameter, (r0, r1)) when ``t`` is a captured parameter or a slice of its rows."""
    if t is None:
        return None
    if id(t) in captured:
        return captured[id(t)], (0, t.shape[0])
    base = t._base
    if base is None or id(base) not in captured or not (t.is_contiguous() and
                                                         base.is_contiguous()):
        return None
    row = base[0].numel() if base.dim() > 1 else 1
    off = t.storage_offset() - base.storage_offset()
    if off % row or t.shape[1:] != base.shape[1:]:
        return None
    return captured[id(base)], (off // row, off // row + t.shape[0])


def functional_linear_rule(m: FunctionalLinear, call: RuleCall) -> list[Use]:
    """The Linear rule on rows ``m.rows`` of the weight, padded with zero rows to its shape."""
    w = m._parameters["weight"]
    r0, r1 = m.rows
    uses = linear_factors(call.args[0], call.grad, r1 - r0, w.shape[1], "weight" in call.wanted,
                          "bias" in call.wanted)
    out: list[Use] = []
    for name, f in uses:
        full = m._parameters[name].shape[0]
        a, b = (r0, r1) if name == "weight" else m.bias_rows
        if isinstance(f, Outer):
            if (a, b) != (0, full):
                left = f.left.new_zeros(*f.left.shape[:-1], full)
                left[..., a:b] = f.left
                f = Outer(left, f.right, full)
        elif (a, b) != (0, full):
            dense = f.new_zeros(f.shape[0], full)
            dense[:, a:b] = f
            f = dense
        out.append((name, f))
    return out


FUNCTIONAL_LINEAR = Rule(functional_linear_rule, batch="leading")
SCOPED = (nn.MultiheadAttention,)
"""Module types whose forward is redirected while captured (see the module docstring)."""


def scope_hooks(module: nn.Module, on_linear: Callable) -> list:
    """Install the pre/post hooks that redirect ``module``'s forward and record its functional
    linears with ``on_linear(x, w, b, out)``; returns the hook handles."""
    state: list = []

    def pre(m: nn.Module, args: tuple) -> None:
        if _MHA is None or torch._C._functorch.maybe_current_level() is not None:
            return
        mode = _Redirect()
        mode.__enter__()
        _RECORDERS.append(on_linear)
        state.append(mode)

    def post(m: nn.Module, args: tuple, out: object) -> None:
        if state:
            _RECORDERS.pop()
            state.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True)]
