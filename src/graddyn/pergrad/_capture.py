"""``graddyn.capture``: record a forward pass, then ONE backward gives per-example gradients.

Forward hooks record, per call of every module that owns captured parameters (and their
ancestors), the inputs and the output tensors. ``Capture.backward`` then calls
``torch.autograd.grad(losses, outputs)`` once: since examples are independent, row n of
d(sum losses)/d(output) is example n's own output gradient, and the per-layer rules
(``_rules_*``) or the torch.func fallback turn (input, output gradient) into per-example
parameter gradients, held factored in :class:`BatchGrads`. No module backward hooks are used,
so torch.func transforms of the model keep working (calls inside transforms are not recorded).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from ._batchcheck import VERDICTS, call_signature, is_suspect, shared_outputs, storage_ptr
from ._batchgrads import BatchGrads
from ._errors import CaptureError, UnsupportedModuleError, batchnorm_message, unsupported_message
from ._grads import NOT_FROM_CAPTURE, output_grads
from ._graphcheck import PlannedCall, stray_message, stray_uses
from ._paramgrads import ParamGrads
from ._rules import RULES, is_coupled_batchnorm
from ._select import resolve_params, resolve_strategy


@dataclass
class _Call:
    """One recorded call: detached inputs, output tensor leaves (in the graph), versions."""

    args: tuple
    kwargs: dict
    outputs: list[Tensor]
    out_pos: list[int]
    ins: list[Tensor]
    versions: list[int]


class _Planned(NamedTuple):
    """One module of the backward plan."""

    module: nn.Module
    kind: str  # 'rule' | 'fallback'
    wanted: set[str]  # its captured parameters, names relative to the module
    serves: frozenset[int]  # their ids


def _param_signature(modules: list[tuple[str, nn.Module]]) -> list[tuple]:
    """What a capture's layout depends on, read from the ``(name, module)`` pairs found at
    the last walk of the tree (no new walk each step): each module's children (a replaced or
    added submodule changes its parent's), its parameter objects, and which of those train."""
    return [(tuple(map(id, m._modules.values())),
             tuple((id(p), p.requires_grad) for p in m._parameters.values() if p is not None))
            for _, m in modules]


class Capture:
    """Context manager returned by :func:`capture`; see there. Entered once; inside its
    block, ``rearm()`` after ``backward()`` records the next forward pass."""

    def __init__(self, model: nn.Module, params: object = None, mode: str = "loss",
                 strategy: str | Mapping[str, str] = "auto", fallback: bool = True,
                 check: bool = True) -> None:
        if mode not in ("loss", "output"):
            raise ValueError(f"mode must be 'loss' or 'output', got {mode!r}.")
        self.model, self.mode, self.fallback, self.check = model, mode, fallback, check
        self._params_arg, self._strategy_arg = params, strategy
        self._layout()
        self._calls: dict[int, list[_Call]] = {}
        self._batch_ptrs: set[int] = set()  # storages of the tensors given to model(...)
        self._handles: list = []
        self._state = "new"
        self._recording = False  # True only while open: hooks record nothing otherwise

    def _layout(self) -> None:
        """Walk the module tree once (a capture per training step should not pay for dozens
        of named_modules() walks); ``rearm`` walks it again only if the parameters changed."""
        model = self.model
        self._modules = list(model.named_modules())  # [(qualified name, module)]
        named = list(model.named_parameters())
        self._names = resolve_params(model, self._params_arg, named)  # id(param) -> name
        self._strategy = resolve_strategy(self._strategy_arg, self._names.values())
        self._qual = {id(m): k for k, m in self._modules}
        self._by_id = {id(p): p for _, p in named}
        self._signature = _param_signature(self._modules)
        # modules owning captured parameters directly: id -> (module, {attr: param})
        self._owners: dict[int, tuple[nn.Module, dict[str, nn.Parameter]]] = {}
        for _, m in self._modules:
            own = {a: p for a, p in m._parameters.items()
                   if p is not None and id(p) in self._names}
            if own:
                self._owners[id(m)] = (m, own)
        self._plans: dict[tuple[int, ...], list[_Planned]] = {}  # called modules -> plan

    # --- recording ----------------------------------------------------------------------
    def __enter__(self) -> Capture:
        if self._state != "new":
            raise CaptureError("a Capture is entered once: open a new `with graddyn.capture("
                               "model)` block for each batch, or call rearm() inside the block "
                               "before the next forward.")
        self._install()
        self._state, self._recording = "open", True
        return self

    def __exit__(self, *exc: object) -> None:
        self._uninstall()
        self._recording = False
        self._state = "closed" if self._state == "open" else self._state

    def rearm(self) -> None:
        """Ready the capture for another forward pass, inside its ``with`` block, after
        ``backward()``: the hooks stay installed (a training loop pays for them once).
        If the model changed since (a module or parameter replaced or added,
        ``requires_grad`` flipped), the module tree is walked and hooked again. Between
        ``backward()`` and ``rearm()`` nothing is recorded, so other forward passes
        (evaluation, another capture of the same model) may run in between."""
        if not self._handles:
            raise CaptureError("rearm() works inside the capture's with block (it keeps the "
                               "hooks installed); open a `with graddyn.capture(model)` first.")
        if _param_signature(self._modules) != self._signature:
            self._uninstall()
            self._layout()
            self._install()
        self._calls.clear()
        self._batch_ptrs.clear()
        self._state, self._recording = "open", True

    def _install(self) -> None:
        self._check_supported()
        for m in self._hooked_modules():
            self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
        self._handles.append(self.model.register_forward_pre_hook(self._root_hook,
                                                                   with_kwargs=True))
        for _, m in self._modules:
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                self._handles.append(m.register_forward_pre_hook(self._bn_check))

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _check_supported(self) -> None:
        if self.fallback:
            return
        for m, own in self._owners.values():
            if type(m) not in RULES:
                raise UnsupportedModuleError(unsupported_message(
                    type(m).__name__, self._qual[id(m)], next(iter(own))))

    def _hooked_modules(self) -> list[nn.Module]:
        """Owners and their ancestors (ancestors serve parameters their child never calls)."""
        keep = set()
        for k, m in self._modules:
            if id(m) in self._owners:
                parts = k.split(".") if k else []
                keep.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        return [m for k, m in self._modules if k in keep]

    def _bn_check(self, m: nn.Module, args: tuple) -> None:
        if self._recording and torch.is_grad_enabled() and is_coupled_batchnorm(m):
            raise CaptureError(batchnorm_message(type(m).__name__, self._qual.get(id(m), "?")))

    def _root_hook(self, m: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._recording and torch._C._functorch.maybe_current_level() is None:
            plain = not kwargs and all(isinstance(a, Tensor) for a in args)  # model(x): no walk
            for t in args if plain else tree_flatten((args, kwargs))[0]:
                if isinstance(t, Tensor):
                    self._batch_ptrs.add(storage_ptr(t))

    def _hook(self, m: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self._recording or torch._C._functorch.maybe_current_level() is not None:
            return  # inside a torch.func transform or our own fallback: not a captured call
        if isinstance(output, Tensor) and not kwargs and all(isinstance(a, Tensor) for a in args):
            if not output.requires_grad:  # fast path: one tensor in, one out (most layers)
                return
            outs, pos = [output], [0]
            ins, detach = list(args), (tuple(a.detach() for a in args), {})
        else:
            leaves, _ = tree_flatten(output)
            pos = [i for i, t in enumerate(leaves) if isinstance(t, Tensor) and t.requires_grad]
            if not pos:
                return  # no graph (e.g. under torch.no_grad)
            outs = [leaves[i] for i in pos]
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
            detach = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (args, kwargs))
        self._calls.setdefault(id(m), []).append(
            _Call(detach[0], detach[1], outs, pos, ins, [t._version for t in outs + ins]))

    # --- backward -----------------------------------------------------------------------
    def backward(self, losses: Tensor, scale: float = 1.0,
                 retain_graph: bool = False) -> BatchGrads:
        """One backward pass -> :class:`BatchGrads` of ``scale * losses[n]`` for each n.

        ``losses``: (B,) per-example losses (mode='loss'), or the model outputs (B, *) in
        mode='output' (flattened to (B, K)). ``scale=1/B`` makes ``grads.sum()`` equal the
        gradient of ``losses.mean()``. ``p.grad`` is not touched. Cost: one backward that
        stops at the captured outputs (no weight gradients), plus the rules.
        """
        self._check_ready(losses)
        self._keep_batched(losses.shape[0])
        reuse = self._drop_shared(losses, scale, retain_graph) if self.check else None
        plan = self._plan()
        if not plan:
            raise CaptureError("nothing captured: no module owning a captured parameter was "
                               "called (with batched inputs) inside the with block.")
        calls = [c for pl in plan for c in self._calls[id(pl.module)]]
        self._check_versions(calls)
        if self.check:
            self._check_graph(losses, plan)
        outs = [t for c in calls for t in c.outputs]
        if reuse is None:
            grads = output_grads(losses, outs, self.mode, scale, retain_graph)
        else:  # the batch probe already computed them
            grads = [reuse.get(id(t)) for t in outs]
            if all(g is None for g in grads):
                raise CaptureError(NOT_FROM_CAPTURE)
        k = 1 if self.mode == "loss" else int(losses[0].numel())
        n = losses.shape[0] * k
        pgs = {i: ParamGrads(name, self._by_id[i], n, strategy=self._strategy[name])
               for i, name in self._names.items()}
        it = iter(grads)
        for m, kind, wanted, _ in plan:
            for c in self._calls[id(m)]:
                gs = [next(it) for _ in c.outputs]
                self._apply(m, kind, wanted, c, gs, k, n, pgs)
        self._calls.clear()
        self._state, self._recording = "done", False
        batch = (losses.shape[0],) if self.mode == "loss" else (losses.shape[0], k)
        return BatchGrads([pgs[i] for i in self._names], batch)

    def _check_ready(self, losses: Tensor) -> None:
        if self._state == "done":
            raise CaptureError("backward() was already called on this capture and its records "
                               "were freed. Fix: capture a new forward pass for each backward.")
        if self._state == "new" or not self._calls:
            raise CaptureError("nothing captured: call the model inside `with graddyn.capture"
                               "(model) as cap:` (with gradients enabled) before cap.backward().")
        if not isinstance(losses, Tensor):
            raise TypeError(f"backward() expects a tensor of per-example losses, got "
                            f"{type(losses).__name__}.")
        want = "(B,) per-example losses, e.g. F.cross_entropy(out, y, reduction='none')"
        if self.mode == "output":
            want = "the model output (B, *) for mode='output'"
        if losses.ndim == 0 or (self.mode == "loss" and losses.ndim != 1):
            raise CaptureError(f"losses has shape {tuple(losses.shape)}; expected {want}. "
                               "A reduced (mean/sum) loss mixes the examples: use "
                               "reduction='none' and pass scale=1/B for a mean.")
        if losses.grad_fn is None:
            raise CaptureError("losses were not built from the captured forward pass (they "
                               "have no autograd graph). Fix: compute them inside the with "
                               "block from the model output, with gradients enabled.")

    def _plan(self) -> list[_Planned]:
        """The backward plan of the recorded calls, memoised by which modules were called
        (a training loop calls the same ones every step)."""
        key = tuple(self._calls)
        if key not in self._plans:
            self._plans[key] = [_Planned(m, kind, wanted,
                                         frozenset(id(m.get_parameter(r)) for r in wanted))
                                for m, kind, wanted in self._derive_plan()]
        return self._plans[key]

    def _derive_plan(self) -> list[tuple[nn.Module, str, set[str]]]:
        """[(module, 'rule'|'fallback', parameter names relative to module)]."""
        plan: dict[int, tuple[nn.Module, str, set[str]]] = {}
        called = {pid for m, own in self._owners.values() if id(m) in self._calls
                  for pid in map(id, own.values())}
        by_name = dict(self._modules)
        for m, own in self._owners.values():
            if id(m) in self._calls:
                kind = "rule" if type(m) in RULES else "fallback"
                plan[id(m)] = (m, kind, set(own))
                continue
            for attr, p in own.items():  # never called: used functionally by an ancestor?
                if id(p) in called:
                    continue
                parts = self._qual[id(m)].split(".")
                for i in range(len(parts) - 1, -1, -1):
                    anc = by_name[".".join(parts[:i])]
                    if id(anc) in self._calls:
                        self._add_functional(plan, anc, ".".join(parts[i:] + [attr]))
                        break
        return list(plan.values())

    def _add_functional(self, plan: dict, anc: nn.Module, rel: str) -> None:
        if not self.fallback:
            raise UnsupportedModuleError(unsupported_message(
                type(anc).__name__, self._qual[id(anc)], rel))
        if id(anc) in plan and plan[id(anc)][1] == "rule":
            return
        plan.setdefault(id(anc), (anc, "fallback", set()))[2].add(rel)

    def _keep_batched(self, b: int) -> None:
        """Keep modules whose every call has batch dimension b; a module also called on
        unbatched inputs (e.g. positional embeddings on arange(T)) shares its output across
        examples, so its parameters are served by the fallback of a batched ancestor."""
        def batched(c: _Call) -> bool:
            return c.outputs[0].ndim > 0 and c.outputs[0].shape[0] == b

        if all(batched(c) for cs in self._calls.values() for c in cs):
            return  # the usual case: nothing to drop
        shapes = [tuple(c.outputs[0].shape) for cs in self._calls.values() for c in cs]
        self._calls = {i: cs for i, cs in self._calls.items() if all(map(batched, cs))}
        if not self._calls:
            raise CaptureError(
                f"losses has batch size {b} but no captured module output has batch size {b} "
                f"(output shapes: {sorted(set(shapes))[:5]}): the captured batch and the losses "
                "must match (one loss per example, batch dimension first).")

    def _drop_shared(self, losses: Tensor, scale: float, retain_graph: bool
                     ) -> dict[int, Tensor] | None:
        """Drop modules with a call whose output only looks batched (``_batchcheck``); their
        parameters go to the fallback of a batched ancestor, like unbatched calls.

        The verdict is cached per model and call signature (module, shapes, strides), so
        a training loop probes once. Returns id(output) -> output gradient of every recorded
        call when the probe ran in mode='loss' (backward need not run again), else None."""
        if not any(is_suspect(c.ins, self._batch_ptrs) for i, cs in self._calls.items()
                   if i in self._owners for c in cs):
            return None
        key = (self.mode, tuple(losses.shape), call_signature(self._calls, self._qual))
        cache = VERDICTS.setdefault(self.model, {})
        if key in cache:
            self._calls = {i: cs for i, cs in self._calls.items() if i not in cache[key]}
            return None
        reuse = self.mode == "loss"
        probed = [(i, c) for i, cs in self._calls.items() if reuse or i in self._owners
                  for c in cs]
        outs = [t for _, c in probed for t in c.outputs]
        flags, g1 = shared_outputs(losses, outs, scale, retain_graph or not reuse)
        it = iter(flags)
        shared = {i for i, c in probed if any([next(it) for _ in c.outputs])}
        cache[key] = shared
        self._calls = {i: cs for i, cs in self._calls.items() if i not in shared}
        return {id(t): g for t, g in zip(outs, g1) if g is not None} if reuse else None

    def _check_graph(self, losses: Tensor, plan: list[_Planned]) -> None:
        """Raise if a captured parameter reaches the losses outside the planned calls."""
        planned = [PlannedCall(c.outputs, c.ins, pl.kind == "fallback", pl.serves)
                   for pl in plan for c in self._calls[id(pl.module)]]
        names = stray_uses(losses, planned, self._names)
        if names:
            raise CaptureError(stray_message(names))

    def _check_versions(self, calls: list[_Call]) -> None:
        for c in calls:
            if [t._version for t in c.outputs + c.ins] != c.versions:
                raise CaptureError("a captured module input or output was modified in place "
                                   "after the forward (e.g. nn.ReLU(inplace=True)); the recorded "
                                   "values are stale. Fix: use out-of-place ops (inplace=False).")

    def _apply(self, m: nn.Module, kind: str, wanted: set[str], c: _Call, gs: list,
               k: int, n: int, pgs: dict[int, ParamGrads]) -> None:
        if len(gs) == 1:  # one output (most layers)
            if gs[0] is None:
                return  # this call does not influence the losses
        elif all(g is None for g in gs):
            return
        else:
            gs = [torch.zeros_like(o) if g is None else g for g, o in zip(gs, c.outputs)]
        if k > 1:  # mode='output': grads (K, B, ...) -> rows n = b K + k; inputs repeated
            gs = [g.movedim(0, 1).reshape(n, *g.shape[2:]) for g in gs]
            c = _Call(*tree_map(lambda t: _repeat(t, k, n // k), (c.args, c.kwargs)),
                      c.outputs, c.out_pos, c.ins, c.versions)
        if kind == "rule":  # a rule serves the module's own parameters (``_parameters``)
            for attr, f in RULES[type(m)](m, c.args, gs[0], wanted):
                pg = pgs[id(m._parameters[attr])]
                pg.add_dense(f) if isinstance(f, Tensor) else pg.add_outer(f)
            return
        from ._fallback import fallback_grads

        recording, self._recording = self._recording, False
        try:
            res = fallback_grads(m, sorted(wanted), c.args, c.kwargs, c.out_pos, gs, n)
        finally:
            self._recording = recording
        for rel, g in res.items():
            pgs[id(m.get_parameter(rel))].add_dense(g)


def _repeat(t: object, k: int, b: int) -> object:
    if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == b:
        return t.repeat_interleave(k, dim=0)
    return t


def capture(model: nn.Module, params: object = None, mode: str = "loss",
            strategy: str | Mapping[str, str] = "auto", fallback: bool = True,
            check: bool = True) -> Capture:
    """Capture a forward pass of ``model`` for per-example gradients.

    Args:
        params: None (all trainable), or parameter/module names, modules or parameters.
        mode: 'loss' (backward of (B,) losses) or 'output' (per-example gradients of each of
            the K model outputs: the empirical NTK is ``grads.gram()`` of shape (B, K, B, K)).
        strategy: 'auto' (cost model), 'ghost' or 'materialize'; or {param/module name: ...}.
        fallback: handle modules without a rule with torch.func; False raises
            :class:`UnsupportedModuleError` instead.
        check: at ``backward()``, walk the autograd graph outside the planned module calls and
            raise :class:`CaptureError` if a captured parameter is also used as a plain tensor
            there (its share of the gradient would be missing). Costs about 1 us per node
            outside the layers; ``False`` skips it (only for models known to be clean).

    A training loop can keep one capture open and call ``cap.rearm()`` before each step's
    forward (the hooks are installed once; nothing is recorded between ``backward()`` and
    ``rearm()``).

    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    >>> with capture(model) as cap:
    ...     losses = F.cross_entropy(model(x), y, reduction="none")
    >>> cap.backward(losses).gram().shape
    torch.Size([5, 5])
    """
    return Capture(model, params, mode, strategy, fallback, check)
