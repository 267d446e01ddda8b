"""``graddyn.capture``: record a forward pass, then ONE backward gives per-example gradients.

Forward hooks record every call of the modules that own captured parameters and of their
ancestors (``_record``). ``Capture.backward`` then

1. walks the graph of the losses (``_walk``) and looks up the plan of this graph's structure
   (``_plan``; made once, with the layout check of ``_layout`` that establishes where the examples
   lie in every recorded tensor: never assumed);
2. runs ONE ``torch.autograd.grad`` from the losses to the outputs of the rule calls (and the
   sources of the exact path): row n of each gradient, in its layout, is example n's own;
3. turns each rule call into factored per-example gradients (``_rules_*``) and serves every
   other use of a captured parameter exactly from the recorded graph (``_local``).

No module backward hooks are used, so torch.func transforms of the model keep working (calls
inside transforms are not recorded).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from weakref import WeakKeyDictionary

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ._batchgrads import BatchGrads
from ._distributed import check_group, gather_params, gather_rows, unwrap
from ._errors import (
    CaptureError,
    ExactPathWarning,
    UnsupportedModuleError,
    batchnorm_message,
    check_losses,
    exact_path_message,
    unsupported_message,
)
from ._functional import as_rule_call, scope_hooks, scoped
from ._grads import output_grads
from ._layout import Layout
from ._local import LocalGraph, book, edge_source, local_grads, losses_source
from ._paramgrads import ParamGrads
from ._plan import Book, Plan, analyse, candidate_rules, internal_nodes, jumps_of
from ._record import Call, batch_pattern, edge_of, ekey, orphaned, record_call, stale
from ._rules import RuleCall, rule_for
from ._rules_norm import is_coupled_batchnorm
from ._select import resolve_params, resolve_strategy
from ._walk import Walk, walk

PLANS: WeakKeyDictionary[nn.Module, dict[tuple, Plan]] = WeakKeyDictionary()
"""model -> {structure key: plan}: a training loop analyses its model once per structure."""
USAGE: WeakKeyDictionary[nn.Module, dict] = WeakKeyDictionary()
"""model -> what its last BatchGrads was asked for (a loop asks the same every step); a
capture that was rearmed goes by its own last batch instead (two loops on one model, one
asking norms and one Grams, do not mislead each other)."""

BATCHNORM_MODES = ("error", "coupled")


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
                 check: bool = True, batchnorm: str = "error",
                 process_group: object = None) -> None:
        if process_group is not None:
            check_group(process_group)
        if mode not in ("loss", "output"):
            raise ValueError(f"mode must be 'loss' or 'output', got {mode!r}.")
        if batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}.")
        self.model, self.mode, self.fallback, self.check = unwrap(model), mode, fallback, check
        self.batchnorm, self.process_group = batchnorm, process_group
        self._params_arg, self._strategy_arg = params, strategy
        self._layout()
        self._calls: list[Call] = []
        self._handles: list = []
        self._state = "new"
        self._recording = False  # True only while open: hooks record nothing otherwise
        self._usage: dict | None = None  # what this capture's last BatchGrads was asked for

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
        self._pos = {pid: i for i, pid in enumerate(self._names)}
        self._captured = {pid: self._by_id[pid] for pid in self._names}
        self._signature = _param_signature(self._modules)
        # modules owning captured parameters directly: id -> {attr: param}
        self._owned: dict[int, set[str]] = {}
        for _, m in self._modules:
            own = {a for a, p in m._parameters.items() if p is not None and id(p) in self._names}
            if own:
                self._owned[id(m)] = own
        self._rules = {id(m): rule_for(m) for _, m in self._modules if id(m) in self._owned}

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
        self._calls = []
        self._state, self._recording = "open", True

    def _install(self) -> None:
        for m in self._hooked_modules():
            self._handles.append(m.register_forward_hook(self._hook, with_kwargs=True))
            if id(m) in self._owned and scoped(m, self._rules.get(id(m)) is not None):
                self._handles += scope_hooks(m, self._recorder(m))
        if self.batchnorm == "error":
            for _, m in self._modules:
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    self._handles.append(m.register_forward_pre_hook(self._bn_check))

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hooked_modules(self) -> list[nn.Module]:
        """Owners and their ancestors (ancestors' outputs are per-example tensors near the
        uses of parameters that no rule serves)."""
        keep = set()
        for k, m in self._modules:
            if id(m) in self._owned:
                parts = k.split(".") if k else []
                keep.update(".".join(parts[:i]) for i in range(len(parts) + 1))
        return [m for k, m in self._modules if k in keep]

    def _bn_check(self, m: nn.Module, args: tuple) -> None:
        if self._recording and torch.is_grad_enabled() and is_coupled_batchnorm(m):
            raise CaptureError(batchnorm_message(type(m).__name__, self._qual.get(id(m), "?")))

    def _hook(self, m: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self._recording or torch._C._functorch.maybe_current_level() is not None:
            return  # inside a torch.func transform: not a captured call
        call = record_call(m, args, kwargs, output)
        if call is not None:
            own = self._owned.get(id(m))
            if own:
                call.wanted, call.rule = own, self._rules.get(id(m))
            self._calls.append(call)

    def _recorder(self, m: nn.Module) -> Callable:
        """What a scoped module's functional calls record (``_functional``): calls on its own
        captured parameters (for nn.MultiheadAttention, its never-called ``out_proj``'s too)."""
        mods = m.modules() if isinstance(m, nn.MultiheadAttention) else [m]
        own = {id(p): a for mod in mods for a, p in mod._parameters.items()
               if p is not None and id(p) in self._names}

        def record(func: Callable, args: tuple, kwargs: dict, out: Tensor) -> None:
            if not self._recording or not out.requires_grad:
                return
            found = as_rule_call(func, args, kwargs, own, self._captured)
            if found is None:
                return  # the graph walk finds this use: book-keeping or the exact path
            mod, rule, wanted, inputs = found
            call = record_call(mod, inputs, {}, out)
            call.rule, call.wanted = rule, wanted
            call.tag = (func.__name__, tuple(id(p) for p in mod._parameters.values()),
                        getattr(mod, "rows", None))
            self._calls.append(call)

        return record

    # --- backward -----------------------------------------------------------------------
    def backward(self, losses: Tensor, scale: float = 1.0,
                 retain_graph: bool = False) -> BatchGrads:
        """One backward pass -> :class:`BatchGrads` of ``scale * losses[n]`` for each n.

        ``losses``: (B,) per-example losses (mode='loss'), or the model outputs (B, *) in
        mode='output' (flattened to (B, K)). Row n of the result is the gradient of
        ``scale * losses[n]`` of this batched forward (its dropout masks, any coupling).
        ``scale=1/B`` makes ``grads.sum()`` equal the gradient of ``losses.mean()``.
        ``p.grad`` is not touched. Cost: one backward that stops at the recorded outputs (no
        weight gradients) plus the rules; the first step of a new model structure also runs
        the layout check (two more backward passes). With ``retain_graph=True`` the records are kept
        too, so ``backward`` may be called again on other losses of the same forward.
        """
        self._check_ready(losses, scale)
        self._recording = False  # a recomputing checkpoint must not record during backward
        calls = self._calls
        if stale(calls):
            raise CaptureError("a captured module input was modified in place after the "
                               "forward (e.g. nn.ReLU(inplace=True) on a layer's input); the "
                               "recorded values are stale. Fix: use out-of-place ops "
                               "(inplace=False).")
        bad = orphaned(calls)
        if bad is not None:
            raise CaptureError(
                f"an output of {type(bad.module).__name__} "
                f"('{self._qual.get(id(bad.module), '?')}') is a view of another tensor and "
                "was modified in place after the call (e.g. out.mul_(2)); its gradient can no "
                "longer be read where the call recorded it. Fix: use out-of-place ops on it "
                "(out = out * 2), or clone it first (out = out.clone()).")
        plan, layout_check, final = self._plan(losses, scale)
        b = losses.shape[0]
        k = 1 if self.mode == "loss" else int(losses[0].numel())
        keep = retain_graph or bool(plan.exact or plan.book_params or plan.book_calls)
        rule_edges = [e for i, lays in plan.rules for e, lay in zip(calls[i].edges, lays)
                      if lay != "unused"]
        refs = plan.sources + (plan.book_calls.sources if plan.book_calls else [])
        srcs = {s: self._source_edge(s, final) for s in refs if s.kind != "losses"}
        edges = rule_edges + list(dict.fromkeys(srcs.values()))
        if not edges:
            grads = []
        elif layout_check is not None and self.mode == "loss":  # computed by the check
            grads = [layout_check.grad[ekey(e)] for e in edges]
        else:
            grads = output_grads(losses, edges, self.mode, scale, keep)
        got = dict(zip(map(ekey, edges), grads))
        pgs = {i: ParamGrads(name, self._by_id[i], b * k, strategy=self._strategy[name])
               for i, name in self._names.items()}
        for i, lays in plan.rules:
            gs = [None if lay == "unused" else got[ekey(e)] for e, lay in zip(calls[i].edges,
                                                                            lays)]
            if any(g is not None for g in gs):
                self._apply_rule(calls[i], lays, gs, b, k, pgs)
        if plan.book_calls:
            self._book_calls(plan, losses, scale, got, srcs, pgs)
        if plan.book_params or plan.exact:
            self._stray(plan, losses, scale, got, srcs, b, k, pgs)
        if retain_graph:  # another backward of the same forward may follow (as in autograd)
            self._state = "retained"
        else:
            self._calls = []
            self._state = "done"
        if self.process_group is not None:  # the global batch, in rank order (_distributed)
            params, info = gather_params([pgs[i] for i in self._names], k, self.process_group)
            n = params[0].n // k
            out = BatchGrads(params, (n,) if self.mode == "loss" else (n, k))
            out.exchange = info
            return out
        shape = (b,) if self.mode == "loss" else (b, k)
        last = self._usage or USAGE.get(self.model)  # did the last batch want a Gram?
        usage = self._usage = USAGE[self.model] = {
            "expect_gram": True if last is None else last["gram"]}
        return BatchGrads([pgs[i] for i in self._names], shape, usage)

    def gather(self, t: Tensor) -> Tensor:
        """With a ``process_group``: every rank's ``t`` (n_r, ...) concatenated in rank order,
        e.g. the losses or targets of the global batch to go with its ``BatchGrads``;
        without one, ``t`` itself."""
        return t if self.process_group is None else gather_rows(t, self.process_group)

    def _check_ready(self, losses: Tensor, scale: float) -> None:
        if self._state == "done":
            raise CaptureError("backward() was already called on this capture and its records "
                               "were freed. Fix: capture a new forward pass for each backward.")
        if self._state in ("new",) or not self._calls:
            raise CaptureError("nothing captured: call the model inside `with graddyn.capture"
                               "(model) as cap:` (with gradients enabled) before cap.backward().")
        check_losses(losses, scale, self.mode)

    def _plan(self, losses: Tensor, scale: float) -> tuple[Plan, object, Walk | None]:
        """The cached plan of this graph's structure, or a new one (with its layout_check)."""
        calls = self._calls
        root = edge_of(losses).node
        cand = candidate_rules(calls, self.mode)
        w0 = walk(root, jumps_of(calls, cand), self._pos) if self.check else None
        key = (self.mode, tuple(losses.shape[1:]), losses.shape[0] == 1,
               batch_pattern(calls, losses.shape[0]), tuple(cand), tuple(self._names),
               None if w0 is None else w0.key)
        cache = PLANS.setdefault(self.model, {})
        plan = cache.get(key)
        if plan is not None:
            final = w0 if plan.jumps == tuple(cand) else None
            refs = plan.sources + (plan.book_calls.sources if plan.book_calls else [])
            needs = any(s.kind == "node" for s in refs)
            if final is None and needs:
                final = walk(root, jumps_of(calls, plan.jumps), self._pos)
            return plan, None, final
        plan, layout_check, final = analyse(calls, losses, scale, self._pos, self._reason,
                                      self._captured, bookkeep=self.mode == "loss")
        if plan.exact:
            reasons = {self._names[p]: r for p, r in plan.exact.items()}
            if not self.fallback:
                raise UnsupportedModuleError(unsupported_message(reasons))
            warnings.warn(exact_path_message(reasons, losses.shape[0]), ExactPathWarning,
                          stacklevel=3)
        cache[key] = plan
        return plan, layout_check, final

    def _reason(self, pid: int, active: set[int], demoted: set[int]) -> str:
        """Why parameter ``pid`` takes the exact path, for the warning."""
        calls = self._calls
        name = self._names[pid]
        attr = name.rsplit(".", 1)[-1]
        owner = next((m for _, m in self._modules if m._parameters.get(attr) is self._by_id[pid]
                      and id(m) in self._owned), None)
        where = type(owner).__name__ if owner is not None else "?"
        mine = [i for i, c in enumerate(calls) if c.module is owner]
        if owner is not None and self._rules.get(id(owner)) is None:
            return f"no closed-form rule for {where}"
        if any(i in demoted for i in mine):
            return (f"an output of {where} is not per-example: shared by the examples or "
                    "coupling them")
        if not mine:
            return f"used outside a call of its {where}"
        if not any(i in active for i in mine):
            return f"the {where} rule does not serve this call (see its conditions)"
        return f"also used outside its {where}'s call"

    def _source_edge(self, s: object, final: Walk | None) -> tuple:
        if s.kind == "call":
            return self._calls[s.i].edges[s.j]
        from torch.autograd.graph import GradientEdge

        return GradientEdge(final.nodes[s.i], s.j)

    def _apply_rule(self, c: Call, lays: list, gs: list, b: int, k: int,
                    pgs: dict[int, ParamGrads]) -> None:
        args, kwargs = c.args, c.kwargs
        if c.rule.accepts is not None:  # a rule of several outputs reads them as they are
            g0 = next(g for g in gs if g is not None)
            outs = [o.detach() if o._version == v else None
                    for o, v in zip(c.outputs, c.out_versions)]
            for attr, f in c.rule.fn(c.module, RuleCall(args, kwargs, g0, c.wanted, gs, outs)):
                pg = pgs[id(c.module._parameters[attr])]
                pg.add_dense(f) if isinstance(f, Tensor) else pg.add_outer(f)
            return
        lay, g = lays[0], gs[0]
        leading = c.rule.batch_of(c.module) == "leading"
        if k == 1:
            if leading and not lay.is_first:
                g, args = lay.front(g, b), (lay.front(args[0], b), *args[1:])
        else:  # mode='output': g (K, *S) -> rows n K + k; inputs repeated K times
            g = Layout(lay.dim + 1, lay.block, lay.minor).front(g, b) if leading else g.movedim(
                1, 0)  # (B, [block,] K, ...)
            if leading and lay.block > 1:
                g = g.transpose(1, 2)
            g = g.reshape(b * k, *g.shape[2:])
            if leading:
                args = (lay.front(args[0], b), *args[1:])
            args, kwargs = tree_map(lambda t: _repeat(t, k, b), (args, kwargs))
        for attr, f in c.rule.fn(c.module, RuleCall(args, kwargs, g, c.wanted)):
            pg = pgs[id(c.module._parameters[attr])]
            pg.add_dense(f) if isinstance(f, Tensor) else pg.add_outer(f)

    def _book(self, bk: Book, losses: Tensor, scale: float, got: dict, srcs: dict,
              internal: dict) -> dict:
        """One book-keeping pass of a plan (``_local.book``): key -> (B, *shape), for the keys
        it serves (parameter ids, ("call", i))."""
        calls, b = self._calls, losses.shape[0]
        edges, seeds = [], []
        for s in bk.sources:
            if s.kind == "losses":
                edges.append((losses.grad_fn, losses.output_nr))
                seeds.append(torch.full_like(losses, scale))
            else:
                e = ekey(srcs[s])
                g = got.get(e)
                edges.append(e)
                seeds.append(torch.zeros(tuple(e[0]._input_metadata[e[1]].shape),
                                         dtype=losses.dtype, device=losses.device)
                             if g is None else g)
        stop = {ekey(calls[i].edges[0]): ("call", i) for i in bk.stops}
        shapes = {**{pid: tuple(self._by_id[pid].shape) for pid in bk.targets},
                  **{e: tuple(calls[i].outputs[0].shape) for e, (_, i) in stop.items()}}
        final = {next((e for e, k in stop.items() if k == key), key): lays
                 for key, lays in bk.final.items()}
        graph = LocalGraph(edges, set(bk.targets), internal, set(stop))
        got_book = book(graph, seeds, bk.layouts, final, b, shapes)
        return {stop.get(k, k): v for k, v in got_book.items() if stop.get(k, k) in bk.keys}

    def _book_calls(self, plan: Plan, losses: Tensor, scale: float, got: dict, srcs: dict,
                    pgs: dict[int, ParamGrads]) -> None:
        """Rule calls whose output is shared by the examples: their per-example output
        gradients from book-keeping, then their rules on inputs repeated per example."""
        b = losses.shape[0]
        for (_, i), g in self._book(plan.book_calls, losses, scale, got, srcs, {}).items():
            c = self._calls[i]
            x = c.args[0]
            args = (x.unsqueeze(0).expand(b, *x.shape), *c.args[1:])
            for attr, f in c.rule.fn(c.module, RuleCall(args, c.kwargs, g, c.wanted)):
                pg = pgs[id(c.module._parameters[attr])]
                pg.add_dense(f) if isinstance(f, Tensor) else pg.add_outer(f)

    def _stray(self, plan: Plan, losses: Tensor, scale: float, got: dict, srcs: dict, b: int,
               k: int, pgs: dict[int, ParamGrads]) -> None:
        """Parameters no rule serves: by book-keeping where the plan validated it, the others
        by the exact path (``_local``)."""
        internal = {pid: set().union(*(internal_nodes(self._calls[i]) for i in idx))
                    for pid, idx in plan.internal.items()}
        if plan.book_params:
            for pid, g in self._book(plan.book_params, losses, scale, got, srcs,
                                     internal).items():
                pgs[pid].add_dense(g)
        if plan.exact:
            sources = []
            for s in plan.sources:
                if s.kind == "losses":
                    sources.append(losses_source(losses, scale, b * k))
                elif got.get(ekey(srcs[s])) is not None:
                    sources.append(edge_source(srcs[s], got[ekey(srcs[s])], s.layout, b, k))
            params = {pid: self._by_id[pid] for pid in plan.exact}
            for pid, g in local_grads(sources, params, internal, b * k).items():
                pgs[pid].add_dense(g)


def _repeat(t: object, k: int, b: int) -> object:
    if isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == b:
        return t.repeat_interleave(k, dim=0)
    return t


def capture(model: nn.Module, params: object = None, mode: str = "loss",
            strategy: str | Mapping[str, str] = "auto", fallback: bool = True,
            check: bool = True, batchnorm: str = "error",
            process_group: object = None) -> Capture:
    """Capture a forward pass of ``model`` for per-example gradients.

    Args:
        params: None (all trainable), or parameter/module names, modules or parameters.
        mode: 'loss' (backward of (B,) losses) or 'output' (per-example gradients of each of
            the K model outputs: the empirical NTK is ``grads.gram()`` of shape (B, K, B, K)).
        strategy: 'auto' (cost model), 'ghost' or 'materialize'; or {param/module name: ...}.
        fallback: parameters no closed-form rule serves (a module without a rule, a weight
            used outside its module's call, a layer whose output couples the examples) come
            from the exact path: batched vector-Jacobian products of the recorded graph,
            about B times the backward of the layers involved (an :class:`ExactPathWarning`
            names them once per model structure). False raises
            :class:`UnsupportedModuleError` naming them instead.
        check: walk the graph at every ``backward()`` (a cost per node outside the
            rule-served layers) so that a changed structure (a parameter used differently, a
            different loss) gets a new plan. False walks it once per module-call pattern:
            only for models whose graph never changes at equal shapes.
        batchnorm: 'error' (BatchNorm with batch statistics is refused: examples are
            coupled) or 'coupled': each row is the gradient of that example's loss through
            the batch statistics (the layers below a BatchNorm take the exact path). For
            per-example gradients that ignore the coupling use eval-mode statistics instead.
        process_group: under data parallelism (``torchrun``, a model plain or wrapped in
            ``DistributedDataParallel``), a ``torch.distributed`` group: every rank's
            ``BatchGrads`` is then the global batch's (all ranks' examples, in rank order;
            identical on every rank), by an all-gather of each layer's factors (or of the
            per-example gradients where those are fewer bytes): see ``_distributed``. Every
            rank must call ``backward``; ``cap.gather(t)`` gives the matching global losses,
            targets, ... ``scale=1/B`` with B the global batch makes ``sum()`` the mean.

    Every per-example tensor's layout (which dimension holds the examples) is established by
    a layout check on the first step of a model structure, never assumed: sequence-first layers,
    shared positional inputs and losses that mix examples are all exact. A training loop can
    keep one capture open and call ``cap.rearm()`` before each step's forward (the hooks are
    installed once; nothing is recorded between ``backward()`` and ``rearm()``).

    >>> model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    >>> x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    >>> with capture(model) as cap:
    ...     losses = F.cross_entropy(model(x), y, reduction="none")
    >>> cap.backward(losses).gram().shape
    torch.Size([5, 5])
    """
    return Capture(model, params, mode, strategy, fallback, check, batchnorm, process_group)

