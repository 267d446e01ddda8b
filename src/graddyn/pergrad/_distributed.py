"""Per-example gradients of the GLOBAL batch under data parallelism.

Under ``DistributedDataParallel`` each rank runs the model on its own share of the global
batch. With ``capture(model, process_group=pg)`` every rank's :class:`BatchGrads` describes
the global batch: after the local backward, each rank all-gathers, per parameter, what its
``ParamGrads`` hold and concatenates it along the examples in rank order. Every query
(``norms``, ``gram``, ``cross_gram``, ``sum``, ``write_grad``, ``materialize``, ``per_param``
and so the winsorized mean) and every instrument is then over the global batch, and
identical on every rank (the same numbers, combined by the same code). Nothing is averaged
or approximated.

What is sent, per parameter, is whichever is fewer bytes over all ranks:

- the ghost factors, ``left`` (N, Gb, T, p) (or token ids (N, T)) and ``right``
  (N, Gb, T, q): N T (p + q) numbers, e.g. a Linear layer on flat inputs sends
  N (in + out), against the N in out of its per-example gradients;
- the per-example gradients (N, *shape), where the parameter has a dense form anyway (biases,
  norm weights, the exact path) or where T (p + q) >= p q (convolutions with many output
  pixels): B x P only for those parameters.

A bias whose per-example gradient is its weight's left factor (Linear) is not sent twice.
Ranks may hold different numbers of examples and positions (T): a shorter factor is padded
with zeros (exact: a zero position adds nothing). Each step costs one ``all_gather_object`` of
the shapes and one ``all_gather`` per dtype; :class:`Exchange` (``grads.exchange``) counts the
bytes. DDP's own gradient all-reduce sends 2 (W - 1) / W P bytes per rank (ring); the
all-gather sends (W - 1) times a rank's buffer: per-example statistics of a global batch of
B examples cost about B (in + out) numbers per MLP layer instead of in x out
(``docs/benchmarks.md``, "Global-batch instruments under DDP", measured with 2 gloo ranks).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._errors import CaptureError
from ._factors import Outer
from ._paramgrads import ParamGrads

Key = tuple  # (param index, "L" | "R" | "D", id-left flag)


@dataclass(frozen=True)
class Exchange:
    """What one backward's exchange cost this rank (bytes).

    ``payload``: this rank's factors, ids and dense parts; ``buffer``: what it contributes to
    the all-gathers (padded to the largest rank's); ``metadata``: the pickled shapes;
    ``sent``: bytes this rank sends, ``(W - 1) (buffer + metadata)`` under a ring all-gather;
    ``dense``: the parameters sent as per-example gradients (N, *shape), not as factors.
    """

    world_size: int
    payload: int
    buffer: int
    metadata: int
    collectives: int
    dense: tuple[str, ...] = ()

    @property
    def sent(self) -> int:
        return (self.world_size - 1) * (self.buffer + self.metadata)


def allreduce_bytes(params: list[nn.Parameter], world_size: int) -> float:
    """Bytes one rank sends in DDP's gradient all-reduce (ring): 2 (W - 1) / W P bytes."""
    n = sum(p.numel() * p.element_size() for p in params)
    return 2.0 * (world_size - 1) / world_size * n


def check_group(group: object) -> None:
    """``capture(process_group=...)`` needs an initialised group."""
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD or ddp_model.process_group), got "
                        f"{type(group).__name__}.")
    if not dist.is_initialized():
        raise CaptureError("process_group given but torch.distributed is not initialised: "
                           "call torch.distributed.init_process_group (torchrun: "
                           "graddyn.distributed.init_from_env()) before capturing.")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (parameter names as in the plain model)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --- the plan: the same on every rank, from every rank's shapes ----------------------------
def describe(pgs: list[ParamGrads], k: int) -> dict:
    """This rank's shapes: per parameter its factors (slot = id-left flag) and dense part,
    and which dense part is the same memory as an earlier dense left factor (Linear's bias)."""
    pieces: dict[Key, tuple] = {}
    alias: dict[Key, Key] = {}
    seen: dict[tuple, Key] = {}
    for i, pg in enumerate(pgs):
        for f in pg.factors:
            pieces[(i, "L", f.index)] = tuple(f.left.shape)
            pieces[(i, "R", f.index)] = tuple(f.right.shape)
            if not f.index and f.left.is_contiguous():
                seen.setdefault((f.left.data_ptr(), f.left.numel()), (i, "L", False))
        d = pg.dense
        if d is not None:
            pieces[(i, "D", False)] = tuple(d.shape)
            src = seen.get((d.data_ptr(), d.numel())) if d.is_contiguous() else None
            if src is not None and pgs[src[0]].dtype == pg.dtype:
                alias[(i, "D", False)] = src
    return {"names": [pg.name for pg in pgs], "n": pgs[0].n if pgs else 0, "k": k,
            "pieces": pieces, "alias": alias,
            "layouts": {(i, f.index): f.layout for i, pg in enumerate(pgs) for f in pg.factors}}


@dataclass
class Form:
    """How one parameter travels: as factors (``slots``: their id-left flags, dense-left
    first, sharing ``layout`` (Gb, p, q)) or, with ``dense``, as per-example gradients
    (N, *shape), or as the left factor it shares its memory with (``alias``)."""

    slots: list[bool]
    dense: bool
    layout: tuple | None = None
    alias: Key | None = None


def plan(metas: list[dict], pgs: list[ParamGrads]) -> list[Form]:
    """One :class:`Form` per parameter, decided identically on every rank: factors unless
    the parameter has a dense part, its ranks disagree on the factors' layout, or its
    per-example gradients are fewer bytes (``strategy='ghost'`` keeps factors)."""
    names = metas[0]["names"]
    for r, m in enumerate(metas):
        if m["names"] != names or m["k"] != metas[0]["k"]:
            raise CaptureError(
                f"ranks captured different things: rank 0 has parameters {names} "
                f"(K = {metas[0]['k']}), rank {r} has {m['names']} (K = {m['k']}). Every rank "
                "must capture the same parameters in the same mode: pass the same params= "
                "and mode= on each.")
    total = sum(m["n"] for m in metas)
    forms = []
    for i, pg in enumerate(pgs):
        lays = {lay for m in metas for (j, _), lay in m["layouts"].items() if j == i}
        slots = sorted({f for m in metas for (j, f) in m["layouts"] if j == i})
        size = _itemsize(pg.dtype)
        factor_bytes = sum(_numel(shape) * (8 if s == "L" and f else size)
                           for m in metas for (j, s, f), shape in m["pieces"].items()
                           if j == i and s != "D")
        rows_bytes = total * pg.param.numel() * size
        dense = (any((i, "D", False) in m["pieces"] for m in metas) or len(lays) > 1
                 or pg.strategy == "materialize"
                 or (factor_bytes >= rows_bytes and pg.strategy != "ghost"))
        forms.append(Form([], True) if dense else Form(slots, False, lays.pop() if lays
                                                       else None))
    for i, form in enumerate(forms):  # a bias that is its weight's (sent) left factor
        srcs = {m["alias"].get((i, "D", False)) for m in metas}
        src = srcs.pop() if len(srcs) == 1 else None
        if form.dense and src is not None and not forms[src[0]].dense:
            form.alias = src
    return forms


def _numel(shape: tuple) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def wire(forms: list[Form], meta: dict, pgs: list[ParamGrads]) -> list[tuple[Key, tuple]]:
    """(key, shape) of the pieces a rank with shapes ``meta`` sends, in order."""
    out = []
    for i, form in enumerate(forms):
        if form.dense:
            if form.alias is None and any(key[0] == i for key in meta["pieces"]):
                out.append(((i, "D", False), (meta["n"], *pgs[i].shape)))
            continue
        out += [((i, s, f), meta["pieces"][(i, s, f)]) for f in form.slots for s in "LR"
                if (i, s, f) in meta["pieces"]]
    return out


# --- this rank's side ----------------------------------------------------------------------
def pack(pgs: list[ParamGrads], keys: list[Key]) -> list[Tensor]:
    """The tensors behind ``keys``: factors as they are, dense forms materialised."""
    out = []
    for i, s, f in keys:
        pg = pgs[i]
        if s == "D":
            out.append(pg.materialize().detach())
        else:
            fac = next(x for x in pg.factors if x.index == f)
            out.append((fac.left if s == "L" else fac.right).detach())
    return out


def merge(pgs: list[ParamGrads], forms: list[Form], ns: list[int],
          got: list[dict[Key, Tensor]]) -> list[ParamGrads]:
    """Every rank's pieces (``got[r]``: key -> tensor; ``ns[r]`` rows) -> global
    ``ParamGrads`` with the rows of rank 0, then rank 1, ...; what a rank lacks is zeros,
    factors with fewer positions are padded with zero positions."""
    total = sum(ns)
    out: list[ParamGrads] = []
    for i, (pg, form) in enumerate(zip(pgs, forms)):
        new = ParamGrads(pg.name, pg.param, total, strategy=pg.strategy)
        key = (i, "D", False)
        if form.alias is not None:  # the gathered left factor, viewed as this dense part
            left = next(f for f in out[form.alias[0]].factors if not f.index).left
            new.dense = left.reshape(total, *pg.shape)
        elif form.dense and any(key in g for g in got):
            new.dense = torch.cat([g[key] if key in g else
                                   pg.param.new_zeros(n, *pg.shape, dtype=pg.dtype)
                                   for g, n in zip(got, ns)])
        new.factors = [_cat_factor(i, f, form.layout, ns, got, pg) for f in form.slots]
        out.append(new)
    return out


def _cat_factor(i: int, f: bool, layout: tuple, ns: list[int], got: list[dict],
                pg: ParamGrads) -> Outer:
    gb, p, q = layout
    t = max(g[(i, "R", f)].shape[2] for g in got if (i, "R", f) in g)
    lefts, rights = [], []
    for g, n in zip(got, ns):
        left, right = g.get((i, "L", f)), g.get((i, "R", f))
        if right is None:  # no such use on this rank: no positions
            right = pg.param.new_zeros(n, gb, 0, q, dtype=pg.dtype)
            left = (pg.param.new_zeros(n, 0, dtype=torch.long) if f
                    else pg.param.new_zeros(n, gb, 0, p, dtype=pg.dtype))
        pad = t - right.shape[2]
        if pad:  # zero positions add nothing to any product
            right = torch.cat([right, right.new_zeros(n, gb, pad, q)], 2)
            left = torch.cat([left, left.new_zeros(n, pad) if f
                              else left.new_zeros(n, gb, pad, p)], 1 if f else 2)
        lefts.append(left)
        rights.append(right)
    return Outer(torch.cat(lefts), torch.cat(rights), p)


# --- communication -------------------------------------------------------------------------
def gather_params(pgs: list[ParamGrads], k: int, group: dist.ProcessGroup
                  ) -> tuple[list[ParamGrads], Exchange]:
    """All ranks' ``ParamGrads`` (mode='output': ``k`` rows per example) concatenated in rank
    order -> (global ParamGrads, this rank's :class:`Exchange`)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    meta = describe(pgs, k)
    metas: list = [None] * world
    dist.all_gather_object(metas, meta, group=group)
    forms = plan(metas, pgs)
    wires = [wire(forms, m, pgs) for m in metas]
    mine = pack(pgs, [key for key, _ in wires[rank]])
    device = pgs[0].param.device
    got: list[dict[Key, Tensor]] = [{} for _ in range(world)]
    dtypes = sorted({_dtype(key, pgs) for w in wires for key, _ in w}, key=str)
    buffer = 0
    for dt in dtypes:
        parts = [[(key, shape) for key, shape in w if _dtype(key, pgs) == dt] for w in wires]
        sizes = [[_numel(shape) for _, shape in ps] for ps in parts]
        longest = max(sum(s) for s in sizes)
        flat = torch.zeros(longest, dtype=dt, device=device)
        local = [t.reshape(-1) for (key, _), t in zip(wires[rank], mine)
                 if _dtype(key, pgs) == dt]
        if local:
            torch.cat(local, out=flat[: sum(sizes[rank])])
        bufs = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(bufs, flat, group=group)
        buffer += longest * flat.element_size()
        for r in range(world):
            chunks = bufs[r].split([*sizes[r], longest - sum(sizes[r])])
            for (key, shape), c in zip(parts[r], chunks):
                got[r][key] = c.view(shape)
    payload = sum(t.numel() * t.element_size() for t in mine)
    dense = tuple(pg.name for pg, f in zip(pgs, forms) if f.dense and f.alias is None)
    info = Exchange(world, payload, buffer, len(pickle.dumps(meta)), 2 + len(dtypes), dense)
    return merge(pgs, forms, [m["n"] for m in metas], got), info


def _dtype(key: Key, pgs: list[ParamGrads]) -> torch.dtype:
    return torch.long if key[1] == "L" and key[2] else pgs[key[0]].dtype


def gather_rows(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Every rank's ``t`` (n_r, *S) concatenated along dim 0 in rank order (n_r may differ;
    S and dtype may not), e.g. the per-example losses or targets of the global batch."""
    world = dist.get_world_size(group)
    n = torch.tensor([t.shape[0]], device=t.device)
    ns = [torch.empty_like(n) for _ in range(world)]
    dist.all_gather(ns, n, group=group)
    sizes = [int(x) for x in ns]
    longest = max(sizes)
    pad = t.new_zeros(longest, *t.shape[1:])
    pad[: t.shape[0]] = t.detach()
    bufs = [torch.empty_like(pad) for _ in range(world)]
    dist.all_gather(bufs, pad, group=group)
    return torch.cat([b[:s] for b, s in zip(bufs, sizes)])
