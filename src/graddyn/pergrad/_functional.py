"""Rule calls for weights that a module uses functionally: ``F.linear(x, self.weight)``.

Some modules own parameters but no rule serves them as modules: ``nn.MultiheadAttention``
passes ``in_proj_weight`` (or row slices of it: the q / k / v blocks) and
``out_proj.weight`` to ``F.linear`` inside ``F.multi_head_attention_forward``; Hugging Face
subclasses (a scaled word embedding, a learned positional embedding, ConvNeXt's layer norm)
call ``F.embedding`` / ``F.layer_norm`` on their own weights inside their own forward. While
such a module runs under a capture, a ``TorchFunctionMode`` active during its forward only
records each call of ``F.linear``, ``F.embedding``, ``F.layer_norm``, ``F.group_norm`` or
``F.conv1d/2d/3d`` whose weight is one of the module's own captured parameters (or, for
``F.linear``, a plain row slice of one) as a *functional rule call*: the rule of the
matching layer then serves it like a module call, at the layout the layout check establishes. For
``nn.MultiheadAttention``, whose forward hands everything to one torch function, that
function is redirected to a copy of itself whose ``linear`` records. Anything else the module
does with its parameters is found by the graph walk and served by book-keeping or the exact
path (``_local``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._factors import Outer
from ._rules import RULES, Rule, RuleCall, Use
from ._rules_linear import linear_factors

_linear = torch._C._nn.linear
_RECORDERS: list[Callable] = []  # the innermost scoped module's recorder


def _recording_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    out = _linear(input, weight, bias)
    if _RECORDERS:
        _RECORDERS[-1](F.linear, (input, weight, bias), {}, out)
    return out


def _with_env(fn: Callable, env: dict) -> Callable:
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
            env[name] = _with_env(env[name], env)
    return _with_env(fn, env)


_MHA = _mha_copy()
RECORDED = (F.linear, F.embedding, F.layer_norm, F.group_norm, F.conv1d, F.conv2d, F.conv3d)


class _Scope(TorchFunctionMode):
    """During one scoped module's forward: redirect MHA's function to the recording copy, and
    hand the recorded functions' calls (with their output) to the recorder."""

    def __init__(self, recorder: Callable) -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_function__(self, func, types_, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward and _MHA is not None:
            return _MHA(*args, **kwargs)
        out = func(*args, **kwargs)
        if func in RECORDED and isinstance(out, Tensor):
            self.recorder(func, args, kwargs, out)
        return out


def scope_hooks(module: nn.Module, recorder: Callable) -> list:
    """Install the pre/post hooks that scope ``module``'s forward (see the module docstring);
    ``recorder(func, args, kwargs, out)``. Returns the hook handles."""
    state: list = []

    def pre(m: nn.Module, args: tuple) -> None:
        if torch._C._functorch.maybe_current_level() is not None:
            return  # inside a torch.func transform: nothing is recorded there
        mode = _Scope(recorder)
        mode.__enter__()
        _RECORDERS.append(recorder)
        state.append(mode)

    def post(m: nn.Module, args: tuple, out: object) -> None:
        if state:
            _RECORDERS.pop()
            state.pop().__exit__(None, None, None)

    return [module.register_forward_pre_hook(pre),
            module.register_forward_hook(post, always_call=True)]


def scoped(m: nn.Module, has_rule: bool) -> bool:
    """Does ``m``'s forward get a recording scope? MHA always; any other module that owns
    captured parameters and has no rule, except recurrent ones (fused kernels)."""
    return isinstance(m, nn.MultiheadAttention) or not (
        has_rule or isinstance(m, nn.RNNBase))


# --- the recorded calls as rule calls -------------------------------------------------------
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


def rows_of(t: Tensor | None, captured: dict[int, nn.Parameter]
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


def _arg(args: tuple, kwargs: dict, i: int, name: str, default: object = None) -> object:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _tuple(v: object, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def as_rule_call(func: Callable, args: tuple, kwargs: dict, own: dict[int, str],
                 captured: dict[int, nn.Parameter]) -> tuple[object, Rule, set[str], tuple
                                                           ] | None:
    """(module-like object, rule, wanted parameter names, inputs) for a recorded functional
    call whose weight/bias are ``own`` captured parameters (id -> name), else None (the graph
    walk then finds the use)."""
    x = args[0] if args else None
    if not isinstance(x, Tensor):
        return None
    if func is F.linear:
        w, b = _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        wl, bl = rows_of(w, captured), rows_of(b, captured)
        if wl is None or id(wl[0]) not in own or (b is not None and b.requires_grad and (
                bl is None or id(bl[0]) not in own)):
            return None
        mod = FunctionalLinear(wl[0], wl[1], None if bl is None else bl[0],
                               None if bl is None else bl[1])
        return mod, FUNCTIONAL_LINEAR, set(mod._parameters), (x,)
    names = {F.embedding: ("weight",), F.layer_norm: ("weight", "bias"),
             F.group_norm: ("weight", "bias")}.get(func, ("weight", "bias"))
    idx = {F.embedding: {"weight": 1}, F.layer_norm: {"weight": 2, "bias": 3},
           F.group_norm: {"weight": 2, "bias": 3}}.get(func, {"weight": 1, "bias": 2})
    params = {n: _arg(args, kwargs, idx[n], n) for n in names}
    if any(p is not None and p.requires_grad and id(p) not in own for p in params.values()):
        return None  # a parameter that is not a plain captured one of this module
    wanted = {n for n, p in params.items() if p is not None and id(p) in own}
    if not wanted:
        return None
    ns = SimpleNamespace(_parameters={n: p for n, p in params.items() if p is not None},
                         training=False, **{n: p for n, p in params.items()})
    if func is F.embedding:
        w = params["weight"]
        pad = _arg(args, kwargs, 2, "padding_idx")
        if _arg(args, kwargs, 3, "max_norm") is not None:
            return None  # renormalises the weight in place
        ns.__dict__.update(num_embeddings=w.shape[0], embedding_dim=w.shape[1],
                           padding_idx=None if pad is None else pad % w.shape[0],
                           scale_grad_by_freq=bool(_arg(args, kwargs, 5, "scale_grad_by_freq")))
        return ns, RULES[nn.Embedding], wanted, (x,)
    if func is F.layer_norm:
        shape = _arg(args, kwargs, 1, "normalized_shape")
        ns.__dict__.update(normalized_shape=_tuple(shape, 1), eps=_arg(args, kwargs, 4, "eps",
                                                                      1e-5))
        return ns, RULES[nn.LayerNorm], wanted, (x,)
    if func is F.group_norm:
        ns.__dict__.update(num_groups=_arg(args, kwargs, 1, "num_groups"),
                           eps=_arg(args, kwargs, 4, "eps", 1e-5), num_channels=x.shape[1])
        return ns, RULES[nn.GroupNorm], wanted, (x,)
    w = params["weight"]  # a convolution
    k = w.dim() - 2
    pad = _arg(args, kwargs, 4, "padding", 0)
    ns.__dict__.update(kernel_size=tuple(w.shape[2:]), out_channels=w.shape[0],
                       stride=_tuple(_arg(args, kwargs, 3, "stride", 1), k),
                       padding=pad if isinstance(pad, str) else _tuple(pad, k),
                       dilation=_tuple(_arg(args, kwargs, 5, "dilation", 1), k),
                       groups=_arg(args, kwargs, 6, "groups", 1), padding_mode="zeros")
    conv = {F.conv1d: nn.Conv1d, F.conv2d: nn.Conv2d, F.conv3d: nn.Conv3d}[func]
    return ns, RULES[conv], wanted, (x,)
