"""Per-example gradient rule for nn.LSTM, nn.GRU and nn.RNN (any layout, layers, directions).

A recurrent layer's weights are used at every step t: with the gate pre-activations split
into their input part gi_t = W_ih x_t + b_ih and hidden part gh_t = W_hh h_{t-1} + b_hh,

    dW_ih,n = sum_t dgi[n,t] (x) x[n,t]      dW_hh,n = sum_t dgh[n,t] (x) h[n,t-1]
    db_ih,n = sum_t dgi[n,t]                 db_hh,n = sum_t dgh[n,t]
    (LSTM with proj_size: dW_hr,n = sum_t dr[n,t] (x) hfull[n,t], r = W_hr hfull)

so each weight's per-example gradient is a factored ``Outer`` over the T steps, like a Linear
layer's over positions. The fused kernel does not expose gi, gh: the rule recomputes the
layer step by step on the recorded input and initial state (the cell definitions of the
PyTorch docs), keeping every step's gate activations, then runs the hand-written backward of
those cells from the recorded output gradients (``out``, ``h_n``, ``c_n``) to every step's
gi and gh, whose rows are per example because the examples of a recurrent layer never meet.
Cost: one forward and backward of the layer step by step, without autograd: about the fused
kernel's own arithmetic (two small matrix products per step), far cheaper than B of them.

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


def _forward(m: nn.RNNBase, layer_in: Tensor, w: dict, h: Tensor, c: Tensor | None,
             steps: range) -> dict:
    """One direction of one layer, step by step without autograd, keeping what its backward
    needs (N examples, T steps, time-indexed): ``hprev`` (N, T, P) the state each step reads,
    ``act`` the gate activations (LSTM: i, f, g, o (N, T, 4H); GRU: r, z, n (N, T, 3H)), ``c``
    (N, T, H) the LSTM cell, ``hn`` (N, T, H) the GRU's W_hn h + b_hn, ``hf`` (N, T, H) the
    LSTM state before its projection, ``out`` (N, T, P) and the last ``h`` / ``c``."""
    n, t_len = layer_in.shape[:2]
    gi = F.linear(layer_in, w["ih"], w["b_ih"])  # (N, T, G): the input part of every step
    st = {"gi": gi, "hprev": layer_in.new_empty(n, t_len, h.shape[-1]),
          "act": torch.empty_like(gi), "out": layer_in.new_empty(n, t_len, h.shape[-1])}
    if m.mode == "LSTM":
        st["c"] = layer_in.new_empty(n, t_len, c.shape[-1])
        if w["hr"] is not None:
            st["hf"] = layer_in.new_empty(n, t_len, c.shape[-1])
    if m.mode == "GRU":
        st["hn"] = layer_in.new_empty(n, t_len, h.shape[-1])
    relu = getattr(m, "nonlinearity", "tanh") == "relu"
    for t in steps:
        st["hprev"][:, t] = h
        gh = F.linear(h, w["hh"], w["b_hh"])  # (N, G)
        a = st["act"][:, t]
        if m.mode == "LSTM":
            pre, hs = gi[:, t] + gh, c.shape[-1]
            torch.sigmoid(pre, out=a)
            a[:, 2 * hs:3 * hs] = torch.tanh(pre[:, 2 * hs:3 * hs])  # the cell input g
            i, f, g, o = a.chunk(4, -1)
            c = f * c + i * g
            st["c"][:, t] = c
            h = o * torch.tanh(c)
            if w["hr"] is not None:
                st["hf"][:, t] = h
                h = F.linear(h, w["hr"])
        elif m.mode == "GRU":
            hs = h.shape[-1]
            gir, giz, gin = gi[:, t].split(hs, -1)
            ghr, ghz, ghn = gh.split(hs, -1)
            r, z = torch.sigmoid(gir + ghr), torch.sigmoid(giz + ghz)
            nn_ = torch.tanh(gin + r * ghn)
            a.copy_(torch.cat([r, z, nn_], -1))
            st["hn"][:, t] = ghn
            h = (1 - z) * nn_ + z * h
        else:
            h = torch.relu(gi[:, t] + gh) if relu else torch.tanh(gi[:, t] + gh)
            a.copy_(h)
        st["out"][:, t] = h
    st["h"], st["c_last"] = h, c
    return st


def _backward(m: nn.RNNBase, st: dict, w: dict, c0: Tensor | None, dout: Tensor,
              dh: Tensor, dc: Tensor | None, steps: range) -> tuple[Tensor, Tensor, Tensor]:
    """Back through one direction of one layer: ``dout`` (N, T, P) the gradient of its
    outputs, ``dh`` / ``dc`` of its last state -> the gradients of the input and hidden parts
    of every step's gate pre-activations, dgi and dgh (N, T, G), and of the projection's
    output, dr (N, T, P) (LSTM with proj_size; else empty). Examples never meet: row n of
    each is example n's own."""
    act, hprev = st["act"], st["hprev"]
    dgi = torch.empty_like(act)
    dgh = dgi if m.mode != "GRU" else torch.empty_like(act)  # the same for LSTM and RNN
    dr = torch.empty_like(dout) if "hf" in st else dout[:, :0]
    relu = getattr(m, "nonlinearity", "tanh") == "relu"
    order = list(steps)
    for k in range(len(order) - 1, -1, -1):
        t = order[k]
        dh = dout[:, t] + dh
        if m.mode == "LSTM":
            if "hf" in st:
                dr[:, t] = dh
                dh = dh @ w["hr"]  # (N, H): the gradient of the state before projection
            i, f, g, o = act[:, t].chunk(4, -1)
            c_prev = st["c"][:, order[k - 1]] if k else c0
            tc = torch.tanh(st["c"][:, t])
            dc = dc + dh * o * (1 - tc * tc)
            dz = dgi[:, t]
            torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                       dh * tc * o * (1 - o)], -1, out=dz)
            dc, carry = dc * f, None
        elif m.mode == "GRU":
            r, z, nn_ = act[:, t].chunk(3, -1)
            dpn = dh * (1 - z) * (1 - nn_ * nn_)
            dpz = dh * (hprev[:, t] - nn_) * z * (1 - z)
            dpr = dpn * st["hn"][:, t] * r * (1 - r)
            torch.cat([dpr, dpz, dpn], -1, out=dgi[:, t])
            torch.cat([dpr, dpz, dpn * r], -1, out=dgh[:, t])
            dz, carry = dgh[:, t], dh * z  # h' = (1 - z) n + z h reads h directly too
        else:
            h = act[:, t]
            dz = dgi[:, t]
            torch.mul(dh, (h > 0).to(h.dtype) if relu else 1 - h * h, out=dz)
            carry = None
        dh = dz @ w["hh"]  # (N, P): to the previous step's state
        if carry is not None:
            dh = dh + carry
    return dgi, dgh, dr


@register_rule(nn.LSTM, applies=_applies, accepts=_accepts)
def rnn_rule(m: nn.RNNBase, call: RuleCall) -> list[Use]:
    """Per-example factors of every weight of the layer; see the module docstring."""
    wdt = m.weight_ih_l0.dtype
    x = call.args[0].detach().to(wdt)
    if not m.batch_first:
        x = x.transpose(0, 1)  # (N, T, D)
    n, t_len = x.shape[:2]
    dirs = 2 if m.bidirectional else 1
    h_size = m.proj_size if m.proj_size > 0 else m.hidden_size
    hx = call.args[1] if len(call.args) > 1 else call.kwargs.get("hx")
    h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
    h0 = x.new_zeros(m.num_layers * dirs, n, h_size) if h0 is None else h0.detach().to(wdt)
    if m.mode == "LSTM":
        c0 = (x.new_zeros(m.num_layers * dirs, n, m.hidden_size) if c0 is None
              else c0.detach().to(wdt))

    def weights(sfx: str) -> dict:
        got = {k: getattr(m, name + sfx, None) for k, name in (
            ("ih", "weight_ih"), ("hh", "weight_hh"), ("hr", "weight_hr"), ("b_ih", "bias_ih"),
            ("b_hh", "bias_hh"))}
        return {k: None if v is None else v.detach() for k, v in got.items()}

    def steps(d: int) -> range:
        return range(t_len - 1, -1, -1) if d else range(t_len)

    # forward, layer by layer: each layer's input is the previous one's outputs
    states, layer_in = [], x
    for layer in range(m.num_layers):
        per = []
        for d in range(dirs):
            k = layer * dirs + d
            w = weights(f"_l{layer}" + ("_reverse" if d else ""))
            per.append(_forward(m, layer_in, w, h0[k], c0[k] if c0 is not None else None,
                                steps(d)) | {"w": w})
        states.append((layer_in, per))
        layer_in = torch.cat([s["out"] for s in per], -1)

    # the recorded gradients: of out (N, T, dirs P), h_n (layers dirs, N, P), c_n
    g_out, g_h, g_c = (list(call.grads) + [None, None])[:3]
    g_out = (x.new_zeros(n, t_len, dirs * h_size) if g_out is None else
             (g_out if m.batch_first else g_out.transpose(0, 1)).to(wdt))
    uses: list[Use] = []
    for layer in range(m.num_layers - 1, -1, -1):  # backward, top layer first
        layer_in, per = states[layer]
        d_in = None
        for d in range(dirs):
            k, sfx = layer * dirs + d, f"_l{layer}" + ("_reverse" if d else "")
            st = per[d]
            w = st["w"]
            dh = g_h[k].to(wdt) if g_h is not None else x.new_zeros(n, h_size)
            dc = (g_c[k].to(wdt) if g_c is not None else x.new_zeros(n, m.hidden_size)) \
                if m.mode == "LSTM" else None
            dout = g_out[..., d * h_size:(d + 1) * h_size]
            dgi, dgh, dr = _backward(m, st, w, c0[k] if c0 is not None else None, dout, dh,
                                     dc, steps(d))
            if layer:  # the gradient of the layer below's outputs (N, T, D_in)
                d_in = dgi @ w["ih"] if d_in is None else d_in + dgi @ w["ih"]
            gsize = dgi.shape[-1]
            wanted = call.wanted
            if "weight_ih" + sfx in wanted:
                uses.append(("weight_ih" + sfx, Outer(dgi[:, None], layer_in[:, None], gsize)))
            if "weight_hh" + sfx in wanted:
                uses.append(("weight_hh" + sfx, Outer(dgh[:, None], st["hprev"][:, None],
                                                      gsize)))
            if "bias_ih" + sfx in wanted:
                uses.append(("bias_ih" + sfx, dgi.sum(1)))
            if "bias_hh" + sfx in wanted:
                uses.append(("bias_hh" + sfx, dgh.sum(1)))
            if "hf" in st and "weight_hr" + sfx in wanted:
                uses.append(("weight_hr" + sfx, Outer(dr[:, None], st["hf"][:, None],
                                                      dr.shape[-1])))
        g_out = d_in
    return uses


for _t in (nn.GRU, nn.RNN):
    register_rule(_t, rnn_rule, applies=_applies, accepts=_accepts)
