"""Weight initialisation schemes, applied to every Linear and Conv layer of a model.

=================  ==============================================  ==========================
scheme             weights                                         reference
=================  ==============================================  ==========================
``xavier``         U(-a, a), Var = gain^2 * 2 / (fan_in + fan_out)  Glorot & Bengio, AISTATS 2010
``xavier-sqrt2``   ``xavier`` with gain sqrt(2) (Var doubled)       Chatterjee, ICLR 2020
``kaiming``        N(0, gain^2 / fan_in), gain sqrt(2) (MSRA)       He et al., ICCV 2015
``gaussian``       same as ``kaiming`` (the name Sankararaman et    Sankararaman et al., ICML 2020
                   al. use)
``orthogonal``     orthogonal rows/columns times gain (default 1);  Saxe et al., ICLR 2014
                   conv kernels flattened to (out, in * k * k)
``pytorch``        left as PyTorch builds it: U(-1/sqrt(fan_in),    ``nn.Linear`` / ``nn.Conv``
                   1/sqrt(fan_in)) for weights and biases           defaults
=================  ==============================================  ==========================

Biases are set to zero (except by ``pytorch``, which changes nothing). Normalisation layers
and embeddings keep their own initialisation.
``gain`` overrides the scheme's default gain. Draws use the global RNG, so construction is
deterministic under ``torch.manual_seed``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

_DEFAULT_GAIN = {
    "xavier": 1.0,
    "xavier-sqrt2": math.sqrt(2.0),
    "kaiming": math.sqrt(2.0),
    "gaussian": math.sqrt(2.0),
    "orthogonal": 1.0,
    "pytorch": 1.0,  # no re-initialisation: the layers' own reset_parameters()
}
INIT_SCHEMES: tuple[str, ...] = tuple(_DEFAULT_GAIN)

_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_scheme(scheme: str) -> None:
    """Raise ``ValueError`` naming the valid schemes if ``scheme`` is unknown."""
    if scheme not in _DEFAULT_GAIN:
        raise ValueError(f"unknown init scheme {scheme!r}; valid: {', '.join(INIT_SCHEMES)}")


def _init_weight(weight: torch.Tensor, scheme: str, gain: float) -> None:
    if scheme.startswith("xavier"):
        nn.init.xavier_uniform_(weight, gain=gain)
    elif scheme == "orthogonal":
        nn.init.orthogonal_(weight, gain=gain)
    else:  # kaiming / gaussian: std = gain / sqrt(fan_in)
        fan_in = weight[0].numel()
        nn.init.normal_(weight, mean=0.0, std=gain / math.sqrt(fan_in))


@torch.no_grad()
def init_weights(model: nn.Module, scheme: str, gain: float | None = None) -> nn.Module:
    """Re-initialise every Linear / Conv weight of ``model`` by ``scheme``; zero the biases.

    Returns ``model`` (changed in place).

    >>> layer = init_weights(nn.Linear(4, 4, bias=False), "orthogonal")
    >>> torch.allclose(layer.weight @ layer.weight.T, torch.eye(4), atol=1e-5)
    True
    """
    check_scheme(scheme)
    if scheme == "pytorch":
        return model
    g = _DEFAULT_GAIN[scheme] if gain is None else float(gain)
    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            _init_weight(module.weight, scheme, g)
            if module.bias is not None:
                module.bias.zero_()
    return model
