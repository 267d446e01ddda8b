"""Closed-form per-example gradient rules for nn.Linear and nn.Embedding.

A rule maps (module, recorded positional inputs, gradient of the loss w.r.t. the recorded
output, wanted parameter names) to a list of ``(attribute, factor)`` where the factor is an
:class:`~graddyn.pergrad._factors.Outer` (ghost-able) or a dense tensor (N, *param.shape).
Row n of the output gradient is example n's own gradient (examples are independent).
"""

from __future__ import annotations

from torch import Tensor, nn

from ._errors import CaptureError
from ._factors import Outer

Use = tuple[str, "Outer | Tensor"]


def linear_rule(m: nn.Linear, args: tuple, g: Tensor, wanted: set[str]) -> list[Use]:
    """y = x W^T + b on x (N, *, in).

    dW_n = sum_t g[n,t] (x) x[n,t]  -> Outer(L = g (N,1,T,out), R = x (N,1,T,in));
    db_n = sum_t g[n,t]             -> dense (N, out). T = product of the leading dims.

    >>> uses = linear_rule(nn.Linear(3, 2), (torch.ones(4, 3),), torch.ones(4, 2), {"bias"})
    >>> uses[0][0], uses[0][1].shape
    ('bias', torch.Size([4, 2]))
    """
    n = g.shape[0]
    x = args[0]
    if x.dim() == 2 and g.dim() == 2:  # (N, in), (N, out): an MLP layer, T = 1; fewest view
        # ops (this runs every measured training step; view() is the cheapest)
        uses = [("weight", Outer(g.view(n, 1, 1, g.shape[1]), x.view(n, 1, 1, x.shape[1]),
                                 m.out_features))] if "weight" in wanted else []
        if "bias" in wanted and m.bias is not None:
            uses.append(("bias", g))
        return uses
    x = x.reshape(n, -1, m.in_features)  # (N, T, in)
    g = g.reshape(n, -1, m.out_features)  # (N, T, out)
    uses = []
    if "weight" in wanted:
        uses.append(("weight", Outer(g[:, None], x[:, None], m.out_features)))
    if "bias" in wanted and m.bias is not None:
        uses.append(("bias", g.sum(1) if g.shape[1] > 1 else g[:, 0]))  # (N, out)
    return uses


def embedding_rule(m: nn.Embedding, args: tuple, g: Tensor, wanted: set[str]) -> list[Use]:
    """y[n,t] = W[id[n,t]] on ids (N, *).

    dW_n = sum_t onehot(id[n,t]) (x) g[n,t] -> Outer(L = ids (N,T), R = g (N,1,T,D)); rows at
    ``padding_idx`` get no gradient (as in F.embedding). Ghost Gram: [id_i,t == id_j,s] g.g.
    """
    if "weight" not in wanted:
        return []
    if m.scale_grad_by_freq:
        raise CaptureError(
            "nn.Embedding(scale_grad_by_freq=True) scales gradients by token counts over the "
            "whole batch, which couples examples: per-example gradients are not defined. "
            "Fix: use scale_grad_by_freq=False while capturing."
        )
    n = g.shape[0]
    ids = args[0].reshape(n, -1)  # (N, T)
    g = g.reshape(n, -1, m.embedding_dim)  # (N, T, D)
    if m.padding_idx is not None:
        g = g * (ids != m.padding_idx)[..., None]
    return [("weight", Outer(ids, g[:, None], m.num_embeddings))]
