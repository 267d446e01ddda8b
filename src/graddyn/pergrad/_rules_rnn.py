"""Per-example gradient rule for nn.LSTM, nn.GRU and nn.RNN (any layout, layers, directions).

A recurrent layer's weights are used at every step t: with the gate pre-activations split
into their input part gi_t = W_ih x_t + b_ih and hidden part gh_t = W_hh h_{t-1} + b_hh,

    dW_ih,n = sum_t dgi[n,t] (x) x[n,t]      dW_hh,n = sum_t dgh[n,t] (x) h[n,t-1]
    db_ih,n = sum_t dgi[n,t]                 db_hh,n = sum_t dgh[n,t]
    (LSTM with proj_size: dW_hr,n = sum_t dr[n,t] (x) hfull[n,t], r = W_hr hfull)

so each weight's per-example gradient is a factored ``Outer`` over the T steps, like a Linear
layer's over positions. The fused kernel does not expose gi, gh: the rule recomputes the
layer step by step on the recorded input and initial state (the same arithmetic as the cell
definitions in the PyTorch docs) and takes ONE backward of the recorded output gradients
(``out``, ``h_n``, ``c_n``) to every step's gi and gh, whose rows are per example because the
examples of a recurrent layer never meet. Cost: one forward and backward of the layer in
Python steps (slower than the fused kernel, far cheaper than B of them).

Not served (the exact path takes over): packed sequences, unbatched calls, and inter-layer
dropout in training mode (its masks are drawn inside the fused kernel).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._factors import Outer
from ._rules import RuleCall, Use, register_rule


def _applies(m: nn.RNNBase, args: tuple, kwargs: dict) -> bool:
    x = args[0] if args else kwargs.get("input")
    return (isinstance(x, Tensor) and x.dim() == 3
            and not (m.training and m.dropout > 0 and m.num_layers > 1))


def _accepts(m: nn.RNNBase, layouts: list) -> bool:
    """out: examples along dim 0 (batch_first) or 1; h_n / c_n: along dim 1."""
    from ._layout import Layout

    want = [Layout(0 if m.batch_first else 1)] + [Layout(1)] * (len(layouts) - 1)
    return all(lay == "unused" or lay == w for lay, w in zip(layouts, want))


def _tracked(t: Tensor) -> Tensor:
    """``t`` as a tensor whose gradient autograd can return: kept in the graph when it is
    already part of it (a later step or layer), else a leaf that requires it."""
    return t if t.requires_grad else t.requires_grad_(True)


def _step(mode: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None,
          nonlin: str) -> tuple[Tensor, Tensor | None]:
    """One cell step from the two pre-activation parts -> (h_full, c)."""
    if mode == "LSTM":
        i, f, g, o = (gi + gh).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if mode == "GRU":
        ir, iz, in_ = gi.chunk(3, -1)
        hr, hz, hn = gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        return (1 - z) * n + z * h, None
    pre = gi + gh
    return (torch.tanh(pre) if nonlin == "tanh" else torch.relu(pre)), None


@register_rule(nn.LSTM, applies=_applies, accepts=_accepts)
def rnn_rule(m: nn.RNNBase, call: RuleCall) -> list[Use]:
    """Per-example factors of every weight of the layer; see the module docstring."""
    x = call.args[0].detach()
    if not m.batch_first:
        x = x.transpose(0, 1)  # (N, T, D)
    n, t_len = x.shape[:2]
    dirs = 2 if m.bidirectional else 1
    h_size = m.proj_size if m.proj_size > 0 else m.hidden_size
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    if isinstance(hx, tuple):
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    h0 = x.new_zeros(m.num_layers * dirs, n, h_size) if h0 is None else h0.detach()
    if m.mode == "LSTM" and c0 is None:
        c0 = x.new_zeros(m.num_layers * dirs, n, m.hidden_size)
    nonlin = getattr(m, "nonlinearity", "tanh")
    wanted = call.wanted
    grads_in, records, outs_h, outs_c = [], [], [], []
    layer_in = x
    with torch.enable_grad():
        for layer in range(m.num_layers):
            per_dir = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh = getattr(m, "weight_ih" + sfx).detach(), getattr(m, "weight_hh"
                                                                              + sfx).detach()
                b_ih = getattr(m, "bias_ih" + sfx).detach() if m.bias else None
                b_hh = getattr(m, "bias_hh" + sfx).detach() if m.bias else None
                w_hr = getattr(m, "weight_hr" + sfx).detach() if m.proj_size > 0 else None
                gi = _tracked(F.linear(layer_in, w_ih, b_ih))  # (N, T, G)
                h = h0[layer * dirs + d]
                c = c0[layer * dirs + d] if c0 is not None else None
                steps = range(t_len - 1, -1, -1) if d else range(t_len)
                ghs, hprev, hfull, rs, hs = [], [], [], [], [None] * t_len
                for t in steps:
                    hprev.append(h)
                    gh = _tracked(F.linear(h, w_hh, b_hh))
                    ghs.append(gh)
                    hf, c = _step(m.mode, gi[:, t], gh, h, c, nonlin)
                    if w_hr is not None:
                        hfull.append(hf)
                        h = F.linear(hf, w_hr)
                        rs.append(h)
                    else:
                        h = hf
                    hs[t] = h
                per_dir.append(torch.stack(hs, 1))  # (N, T, H) in time order
                outs_h.append(h)
                outs_c.append(c)
                grads_in += [gi, *ghs, *rs]
                records.append((sfx, gi, ghs, hprev, hfull, rs, layer_in))
            layer_in = torch.cat(per_dir, -1) if dirs > 1 else per_dir[0]
        out = layer_in if m.batch_first else layer_in.transpose(0, 1)
        results = [out, torch.stack(outs_h)] + ([torch.stack(outs_c)] if m.mode == "LSTM"
                                                 else [])
    outs, gouts = [], []
    for r, g in zip(results, call.grads):
        if g is not None:
            outs.append(r)
            gouts.append(g)
    d_all = torch.autograd.grad(outs, grads_in, gouts, allow_unused=True)
    it = iter(d_all)
    uses: list[Use] = []
    for sfx, gi, ghs, hprev, hfull, rs, layer_in in records:
        dgi = next(it)
        dgh = [next(it) for _ in ghs]
        drs = [next(it) for _ in rs]
        dgi = torch.zeros_like(gi) if dgi is None else dgi  # (N, T, G)
        dgh_t = torch.stack([torch.zeros_like(ghs[0]) if g is None else g for g in dgh], 1)
        hp = torch.stack(hprev, 1).detach()  # (N, T, H) in step order
        gsize = dgi.shape[-1]
        if "weight_ih" + sfx in wanted:
            uses.append(("weight_ih" + sfx, Outer(dgi[:, None], layer_in.detach()[:, None],
                                                  gsize)))
        if "weight_hh" + sfx in wanted:
            uses.append(("weight_hh" + sfx, Outer(dgh_t[:, None], hp[:, None], gsize)))
        if "bias_ih" + sfx in wanted:
            uses.append(("bias_ih" + sfx, dgi.sum(1)))
        if "bias_hh" + sfx in wanted:
            uses.append(("bias_hh" + sfx, dgh_t.sum(1)))
        if rs and "weight_hr" + sfx in wanted:
            dr = torch.stack([torch.zeros_like(rs[0]) if g is None else g for g in drs], 1)
            hf = torch.stack(hfull, 1).detach()
            uses.append(("weight_hr" + sfx, Outer(dr[:, None], hf[:, None], dr.shape[-1])))
    return uses


for _t in (nn.GRU, nn.RNN):
    register_rule(_t, rnn_rule, applies=_applies, accepts=_accepts)
