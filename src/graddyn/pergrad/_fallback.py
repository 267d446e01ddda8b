"""torch.func fallback: per-example gradients of one module's own parameters.

For a recorded call y = f(x; theta) with output gradients G (N, ...) (row n = example n),
dtheta_n = vjp_theta f(x_n; theta)[G_n], computed for all n at once with
``vmap(vjp(functional_call))``. Materialised: memory N x numel(theta); cost about N times one
small forward+backward of the module (vectorised). Exact for any module whose example n's
output depends only on input row n (no batch statistics, no dropout inside the module).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten


def fallback_grads(module: nn.Module, names: list[str], args: tuple, kwargs: dict,
                   out_pos: list[int], grads: list[Tensor], n: int) -> dict[str, Tensor]:
    """Per-example grads of ``module``'s parameters ``names`` -> dict name -> (N, *shape).

    ``out_pos`` picks the tensor leaves of the module output whose gradients ``grads``
    (each (N, ...)) were recorded; other leaves get no cotangent.

    >>> lin = nn.Linear(3, 2); x = torch.randn(5, 3)
    >>> fallback_grads(lin, ["weight"], (x,), {}, [0], [torch.ones(5, 2)], 5)["weight"].shape
    torch.Size([5, 2, 3])
    """
    params = {k: module.get_parameter(k).detach() for k in names}
    leaves, spec = tree_flatten((args, kwargs))
    dims = [0 if isinstance(x, Tensor) and x.ndim > 0 and x.shape[0] == n else None
            for x in leaves]

    def one(leaves_b: list, grads_b: list[Tensor]) -> dict[str, Tensor]:
        full = [x.unsqueeze(0) if d == 0 else x for x, d in zip(leaves_b, dims)]
        a, kw = tree_unflatten(full, spec)

        def f(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            out_leaves, _ = tree_flatten(functional_call(module, p, tuple(a), kw))
            return tuple(out_leaves[i] for i in out_pos)

        _, pullback = vjp(f, params)
        return pullback(tuple(g.unsqueeze(0) for g in grads_b))[0]

    with torch.enable_grad():
        return vmap(one, in_dims=(dims, 0))(leaves, list(grads))
