"""Per-example gradient rule for nn.LSTM, nn.GRU and nn.RNN (any layout, layers, directions).

A recurrent layer's weights are used at every step t: with the gate pre-activations split
into their input part gi_t = W_ih x_t + b_ih and hidden part gh_t = W_hh h_{t-1} + b_hh,

    dW_ih,n = sum_t dgi[n,t] (x) x[n,t]      dW_hh,n = sum_t dgh[n,t] (x) h[n,t-1]
    db_ih,n = sum_t dgi[n,t]                 db_hh,n = sum_t dgh[n,t]
    (LSTM with proj_size: dW_hr,n = sum_t dr[n,t] (x) hfull[n,t], r = W_hr hfull)

so each weight's per-example gradient is a factored ``Outer`` over the T steps, like a Linear
layer's over positions. The fused kernel does not expose gi, gh, so the rule rebuilds them:

- forward, batched over all steps: each layer's outputs are the states h_t its steps read
  (the recorded output of the top layer; lower layers, or a top output modified in place
  since, again by the fused kernel without autograd), so every step's gate activations come
  from two matrix products over all steps at once; only the LSTM cell c_t = f_t c_{t-1} +
  i_t g_t needs a loop over steps (one fused multiply-add each);
- backward through time from the recorded output gradients (``out``, ``h_n``, ``c_n``): a
  loop over steps of one small matrix product (to the previous state) and a few
  multiplications by gate derivatives computed beforehand for all steps at once.

Rows of dgi, dgh are per example because the examples of a recurrent layer never meet.
Cost: about one forward and backward of the layer's own arithmetic, far less than B of them.

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


_FUSED = {"LSTM": torch._VF.lstm, "GRU": torch._VF.gru, "RNN_TANH": torch._VF.rnn_tanh,
          "RNN_RELU": torch._VF.rnn_relu}


def _fused_layer(m: nn.RNNBase, layer: int, x: Tensor, h0: Tensor, c0: Tensor | None
                 ) -> Tensor:
    """Layer ``layer``'s outputs (N, T, dirs P) on its input ``x`` (N, T, D) by the fused
    kernel, without autograd; ``h0`` / ``c0``: (dirs, N, *) its initial states."""
    dirs = 2 if m.bidirectional else 1
    per = len(m._flat_weights) // (m.num_layers * dirs)  # tensors per layer and direction
    ws = [w.detach() for w in m._flat_weights[layer * dirs * per:(layer + 1) * dirs * per]]
    hx = (h0, c0) if m.mode == "LSTM" else h0
    with torch.no_grad():
        return _FUSED[m.mode](x, hx, ws, m.bias, 1, 0.0, False, m.bidirectional, True)[0]


def _shift(seq: Tensor, first: Tensor, reverse: bool) -> Tensor:
    """(N, T, H) values per step -> the value each step reads from the step before it in
    processing order (``first`` (N, H) for the first processed step)."""
    if reverse:
        return torch.cat([seq[:, 1:], first[:, None]], 1)
    return torch.cat([first[:, None], seq[:, :-1]], 1)


def _gates(m: nn.RNNBase, x: Tensor, h: Tensor, w: dict, h0: Tensor, c0: Tensor | None,
           reverse: bool) -> dict:
    """One direction of one layer, all steps at once: its input ``x`` (N, T, D) and outputs
    ``h`` (N, T, P) -> what its backward needs: ``hprev`` (N, T, P) the state each step reads
    and the gate derivatives, shapes (N, T, k, H) (see ``_backward``); LSTM: ``f`` (N, T, H),
    ``hf`` (N, T, H) the state before the projection; GRU: ``z`` (N, T, H)."""
    hprev = _shift(h, h0, reverse)
    gi = F.linear(x, w["ih"], w["b_ih"]).contiguous()  # (N, T, G)
    if m.mode != "GRU":  # the pre-activations gi + gh, accumulated by the second product
        pre = gi.view(-1, gi.shape[-1]).addmm_(hprev.reshape(-1, hprev.shape[-1]),
                                               w["hh"].T).view(gi.shape)
        if w["b_hh"] is not None:
            pre += w["b_hh"]
    else:
        gh = F.linear(hprev, w["hh"], w["b_hh"])
    if m.mode == "LSTM":
        hs = pre.shape[-1] // 4
        act = pre.sigmoid()  # (N, T, 4H): i, f, o; g, the cell input, is a tanh
        act[..., 2 * hs:3 * hs] = pre[..., 2 * hs:3 * hs].tanh()
        i, f, g, o = act.chunk(4, -1)
        c = torch.empty_like(i)  # c_t = f_t c_{t-1} + i_t g_t: the only loop of the forward
        ig, prev = i * g, c0
        for t in (range(c.shape[1] - 1, -1, -1) if reverse else range(c.shape[1])):
            prev = torch.addcmul(ig[:, t], f[:, t], prev, out=c[:, t])
        tc = c.tanh()
        cprev = _shift(c, c0, reverse)
        # dc_t = dc_{t+1} f_{t+1} + dh_t o_t (1 - tanh^2 c_t); d(i, f, g) = dc_t * k[:, :3],
        # d o = dh_t * k[:, 3]
        k = torch.stack([g * i * (1 - i), cprev * f * (1 - f), i * (1 - g * g),
                         tc * o * (1 - o)], 2)
        st = {"k": k, "dc_dh": o * (1 - tc * tc), "f": f}
        if w["hr"] is not None:
            st["hf"] = o * tc
    elif m.mode == "GRU":
        (gir, giz, gin), (ghr, ghz, ghn) = gi.chunk(3, -1), gh.chunk(3, -1)
        r, z = (gir + ghr).sigmoid(), (giz + ghz).sigmoid()
        n = (gin + r * ghn).tanh()
        cn = (1 - z) * (1 - n * n)  # d(n pre-activation) / dh_t
        cr = cn * ghn * r * (1 - r)
        cz = (hprev - n) * z * (1 - z)
        # dgi_t = dh_t * k_gi, dgh_t = dh_t * k_gh (the n part of gh is scaled by r)
        st = {"k_gi": torch.stack([cr, cz, cn], 2), "k": torch.stack([cr, cz, cn * r], 2),
              "z": z}
    else:
        act = pre.relu() if m.mode == "RNN_RELU" else pre.tanh()
        st = {"k": ((pre > 0).to(pre.dtype) if m.mode == "RNN_RELU" else 1 - act * act)[:, :, None]}
    st["hprev"] = hprev
    return st


def _backward(m: nn.RNNBase, st: dict, w: dict, dout: Tensor, dh: Tensor,
              dc: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Back through one direction of one layer: ``dout`` (N, T, P) the gradient of its
    outputs, ``dh`` / ``dc`` of its last state -> the gradients of the input and hidden parts
    of every step's gate pre-activations, dgi and dgh (N, T, G), and of the projection's
    output, dr (N, T, P) (LSTM with proj_size; else empty)."""
    k = st["k"]  # (N, T, parts, H)
    n, t_len = k.shape[:2]
    dgh = torch.empty_like(k)
    proj = "hf" in st
    dr = torch.empty_like(dout) if proj else dout[:, :0]
    keep_dh = m.mode == "GRU"
    dhs = torch.empty_like(dout) if keep_dh else None
    w_hh = w["hh"]
    dz = later = None  # the gate gradients (N, G) of the step processed before, its index
    for t in (range(t_len) if reverse else range(t_len - 1, -1, -1)):
        # dh_t = dout_t + (gradient through the later step's gates) [+ GRU's direct z h path]
        if dz is None:
            dh = dout[:, t] + dh
        else:
            carry = dh
            dh = torch.addmm(dout[:, t], dz, w_hh)
            if keep_dh:
                dh.addcmul_(carry, st["z"][:, later])
        if m.mode == "LSTM":
            if proj:
                dr[:, t] = dh
                dh = dh @ w["hr"]  # (N, H): the gradient of the state before projection
            dc = torch.addcmul(dc, dh, st["dc_dh"][:, t])
            torch.mul(k[:, t, :3], dc[:, None], out=dgh[:, t, :3])
            torch.mul(k[:, t, 3], dh, out=dgh[:, t, 3])
            dc = dc * st["f"][:, t]
        else:
            if keep_dh:
                dhs[:, t] = dh
            torch.mul(k[:, t], dh[:, None], out=dgh[:, t])
        dz, later = dgh[:, t].reshape(n, -1), t
    dgh = dgh.reshape(n, t_len, -1)
    dgi = (st["k_gi"] * dhs[:, :, None]).reshape(n, t_len, -1) if keep_dh else dgh
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
    top = call.outputs[0] if call.outputs else None  # None: modified in place since the call
    if top is not None:
        top = (top if m.batch_first else top.transpose(0, 1)).to(wdt)

    def weights(sfx: str) -> dict:
        got = {k: getattr(m, name + sfx, None) for k, name in (
            ("ih", "weight_ih"), ("hh", "weight_hh"), ("hr", "weight_hr"), ("b_ih", "bias_ih"),
            ("b_hh", "bias_hh"))}
        return {k: None if v is None else v.detach() for k, v in got.items()}

    # forward, layer by layer: each layer's outputs are the next one's input
    states, layer_in = [], x
    for layer in range(m.num_layers):
        ks = slice(layer * dirs, (layer + 1) * dirs)
        out = top if layer == m.num_layers - 1 and top is not None else _fused_layer(
            m, layer, layer_in, h0[ks], c0[ks] if c0 is not None else None)
        per = []
        for d in range(dirs):
            k = layer * dirs + d
            w = weights(f"_l{layer}" + ("_reverse" if d else ""))
            per.append(_gates(m, layer_in, out[..., d * h_size:(d + 1) * h_size], w, h0[k],
                              c0[k] if c0 is not None else None, bool(d)) | {"w": w})
        states.append((layer_in, per))
        layer_in = out

    # the recorded gradients: of out (N, T, dirs P), h_n (layers dirs, N, P), c_n
    g_out, g_h, g_c = (list(call.grads) + [None, None])[:3]
    g_out = (x.new_zeros(n, t_len, dirs * h_size) if g_out is None else
             (g_out if m.batch_first else g_out.transpose(0, 1)).to(wdt))
    uses: list[Use] = []
    wanted = call.wanted
    for layer in range(m.num_layers - 1, -1, -1):  # backward, top layer first
        layer_in, per = states[layer]
        d_in = None
        for d in range(dirs):
            k, sfx = layer * dirs + d, f"_l{layer}" + ("_reverse" if d else "")
            st, w = per[d], per[d]["w"]
            dh = g_h[k].to(wdt) if g_h is not None else x.new_zeros(n, h_size)
            dc = (g_c[k].to(wdt) if g_c is not None else x.new_zeros(n, m.hidden_size)) \
                if m.mode == "LSTM" else None
            dout = g_out[..., d * h_size:(d + 1) * h_size]
            dgi, dgh, dr = _backward(m, st, w, dout, dh, dc, bool(d))
            if layer:  # the gradient of the layer below's outputs (N, T, D_in)
                d_in = dgi @ w["ih"] if d_in is None else d_in + dgi @ w["ih"]
            gsize = dgi.shape[-1]
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
