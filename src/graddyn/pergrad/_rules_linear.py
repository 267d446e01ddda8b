"""Closed-form per-example gradient rules for nn.Linear, nn.Embedding and nn.EmbeddingBag.

Row n of ``call.grad`` is example n's own output gradient (the engine established it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._errors import CaptureError
from ._factors import Outer
from ._rules import RuleCall, Use, register_rule


def linear_factors(x: Tensor, g: Tensor, out_features: int, in_features: int,
                   wanted_weight: bool, wanted_bias: bool) -> list[tuple[str, Outer | Tensor]]:
    """y = x W^T + b on x (N, *, in): dW_n = sum_t g[n,t] (x) x[n,t] -> Outer(g, x);
    db_n = sum_t g[n,t] -> (N, out). T = product of the leading dims after N."""
    n = g.shape[0]
    if x.dim() == 2 and g.dim() == 2:  # (N, in), (N, out): an MLP layer, T = 1
        uses: list = [("weight", Outer(g.view(n, 1, 1, out_features),
                                       x.view(n, 1, 1, in_features), out_features))
                      ] if wanted_weight else []
        if wanted_bias:
            uses.append(("bias", g))
        return uses
    x = x.reshape(n, -1, in_features)  # (N, T, in)
    g = g.reshape(n, -1, out_features)  # (N, T, out)
    uses = [("weight", Outer(g[:, None], x[:, None], out_features))] if wanted_weight else []
    if wanted_bias:
        uses.append(("bias", g.sum(1) if g.shape[1] > 1 else g[:, 0]))  # (N, out)
    return uses


@register_rule(nn.Linear, batch="leading")
def linear_rule(m: nn.Linear, call: RuleCall) -> list[Use]:
    """y = x W^T + b on x (N, *, in) -> Outer(L = g (N,1,T,out), R = x (N,1,T,in)), bias dense.

    >>> uses = linear_rule(nn.Linear(3, 2), RuleCall((torch.ones(4, 3),), {}, torch.ones(4, 2),
    ...                                              {"bias"}))
    >>> uses[0][0], uses[0][1].shape
    ('bias', torch.Size([4, 2]))
    """
    return linear_factors(call.args[0], call.grad, m.out_features, m.in_features,
                          "weight" in call.wanted, "bias" in call.wanted and m.bias is not None)


register_rule(nn.modules.linear.NonDynamicallyQuantizableLinear, linear_rule, batch="leading")


@register_rule(nn.Embedding, batch="leading")
def embedding_rule(m: nn.Embedding, call: RuleCall) -> list[Use]:
    """y[n,t] = W[id[n,t]] on ids (N, *).

    dW_n = sum_t onehot(id[n,t]) (x) g[n,t] -> Outer(L = ids (N,T), R = g (N,1,T,D)); rows at
    ``padding_idx`` get no gradient (as in F.embedding). Ghost Gram: [id_i,t == id_j,s] g.g.
    """
    if "weight" not in call.wanted:
        return []
    if m.scale_grad_by_freq:
        raise CaptureError(
            "nn.Embedding(scale_grad_by_freq=True) scales gradients by token counts over the "
            "whole batch, which couples examples: per-example gradients are not defined. "
            "Fix: use scale_grad_by_freq=False while capturing."
        )
    g = call.grad
    n = g.shape[0]
    ids = call.args[0].reshape(n, -1)  # (N, T)
    g = g.reshape(n, -1, m.embedding_dim)  # (N, T, D)
    if m.padding_idx is not None:
        g = g * (ids != m.padding_idx)[..., None]
    return [("weight", Outer(ids, g[:, None], m.num_embeddings))]


def _bag_inputs(m: nn.EmbeddingBag, call: RuleCall) -> tuple[Tensor, Tensor | None, Tensor | None]:
    names = ("input", "offsets", "per_sample_weights")
    vals = dict(zip(names, call.args))
    vals.update({k: v for k, v in call.kwargs.items() if k in names})
    return vals["input"], vals.get("offsets"), vals.get("per_sample_weights")


def _bags(m: nn.EmbeddingBag, ids: Tensor, offsets: Tensor | None, psw: Tensor | None,
          n: int) -> tuple[Tensor, Tensor]:
    """(N, T) ids and (N, T) weights of each bag's entries, padded with weight 0."""
    if ids.dim() == 2:
        w = psw if psw is not None else torch.ones(ids.shape, dtype=torch.float64,
                                                   device=ids.device)
        return ids, w
    starts = offsets[:n]  # offsets (N,) or, with include_last_offset, (N + 1,)
    ends = offsets[1:n + 1] if m.include_last_offset else torch.cat(
        [offsets[1:n], offsets.new_tensor([ids.numel()])])
    lengths = ends - starts
    t = max(int(lengths.max()) if lengths.numel() else 0, 1)
    bag = torch.repeat_interleave(torch.arange(n, device=ids.device), lengths)  # entry -> bag
    pos = torch.arange(bag.numel(), device=ids.device) - starts[bag]  # entry -> slot in bag
    out_ids = ids.new_zeros(n, t)
    out_w = torch.zeros(n, t, dtype=torch.float64 if psw is None else psw.dtype,
                        device=ids.device)
    out_ids[bag, pos] = ids[: bag.numel()]
    out_w[bag, pos] = 1.0 if psw is None else psw[: bag.numel()]
    return out_ids, out_w


def _bag_applies(m: nn.EmbeddingBag, args: tuple, kwargs: dict) -> bool:
    return m.mode in ("sum", "mean") and not m.scale_grad_by_freq


@register_rule(nn.EmbeddingBag, applies=_bag_applies)
def embedding_bag_rule(m: nn.EmbeddingBag, call: RuleCall) -> list[Use]:
    """Bag n sums (``mode='sum'``, times ``per_sample_weights``) or averages its entries:
    dW_n = sum_t w[n,t] onehot(id[n,t]) (x) g[n] -> Outer(L = ids (N,T), R = w g (N,1,T,D)).
    Entries at ``padding_idx`` count for nothing (nor in a mean's count). ``mode='max'`` picks
    one entry per coordinate: served by the exact path."""
    if "weight" not in call.wanted:
        return []
    g = call.grad  # (N, D)
    n = g.shape[0]
    ids, offsets, psw = _bag_inputs(m, call)
    ids_nt, w = _bags(m, ids, offsets, psw, n)
    w = w.to(g.dtype)
    if m.padding_idx is not None:
        w = w * (ids_nt != m.padding_idx)
    if m.mode == "mean":  # entries kept (not padding) make each bag's count
        w = w / w.ne(0).sum(1, keepdim=True).clamp_min(1)
    right = g[:, None, :] * w[..., None]  # (N, T, D)
    return [("weight", Outer(ids_nt, right[:, None], m.num_embeddings))]
