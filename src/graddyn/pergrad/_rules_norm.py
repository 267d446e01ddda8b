"""Per-example gradient rules for affine normalisation layers (few parameters: dense).

y = x_hat * w + b with x_hat recomputed from the recorded input x exactly as the forward
computed it, so dw_n = sum over the non-parameter positions of example n of g * x_hat and
db_n = sum of g. Cost O(N numel(x)).

BatchNorm in training mode normalises with the statistics of the whole batch: x_hat is still
the forward's, so the rule for its own weight and bias stays exact, and the engine serves the
layers below it (whose outputs reach every loss through the statistics) by the exact path. It
is refused unless ``capture(model, batchnorm="coupled")`` asks for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._rules import RuleCall, Use, register_rule


def affine_uses(x_hat: Tensor, g: Tensor, pshape: tuple[int, ...], channel_dim: bool,
                m: nn.Module, wanted: set[str]) -> list[Use]:
    """dw_n = sum g * x_hat, db_n = sum g over example n's positions -> dense (N, *pshape).
    ``channel_dim``: the parameters index dim 1 of (N, C, *), else the trailing dims."""
    n = g.shape[0]
    if channel_dim:  # (N, C, *) -> (N, C, rest)
        gx, gg, dims = (g * x_hat).reshape(n, pshape[0], -1), g.reshape(n, pshape[0], -1), 2
    else:  # (N, *, *pshape) -> (N, rest, *pshape)
        gx, gg, dims = (g * x_hat).reshape(n, -1, *pshape), g.reshape(n, -1, *pshape), 1
    uses: list[Use] = []
    if "weight" in wanted and getattr(m, "weight", None) is not None:
        uses.append(("weight", gx.sum(dims)))
    if "bias" in wanted and getattr(m, "bias", None) is not None:
        uses.append(("bias", gg.sum(dims)))
    return uses


@register_rule(nn.LayerNorm, batch="leading")
def layernorm_rule(m: nn.LayerNorm, call: RuleCall) -> list[Use]:
    """x_hat = (x - mean) / sqrt(var + eps) over ``normalized_shape`` -> dense (N, *shape)."""
    x_hat = F.layer_norm(call.args[0], m.normalized_shape, eps=m.eps)
    return affine_uses(x_hat, call.grad, tuple(m.normalized_shape), False, m, call.wanted)


@register_rule(nn.RMSNorm, batch="leading")
def rmsnorm_rule(m: nn.RMSNorm, call: RuleCall) -> list[Use]:
    """x_hat = x / sqrt(mean(x^2) + eps) over ``normalized_shape`` -> dense (N, *shape)."""
    x_hat = F.rms_norm(call.args[0], m.normalized_shape, eps=m.eps)
    return affine_uses(x_hat, call.grad, tuple(m.normalized_shape), False, m, call.wanted)


@register_rule(nn.GroupNorm)
def groupnorm_rule(m: nn.GroupNorm, call: RuleCall) -> list[Use]:
    """x_hat per example and group of channels; parameters per channel -> dense (N, C)."""
    x_hat = F.group_norm(call.args[0], m.num_groups, eps=m.eps)
    return affine_uses(x_hat, call.grad, (m.num_channels,), True, m, call.wanted)


def _channels_first_batched(m: nn.Module, args: tuple, kwargs: dict) -> bool:
    """InstanceNorm/BatchNorm on (N, C, *spatial) (not an unbatched (C, *spatial) call)."""
    spatial = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}.get(type(m))
    return bool(args) and (spatial is None or args[0].dim() == spatial + 2)


def batchnorm_rule(m: nn.modules.batchnorm._BatchNorm, call: RuleCall) -> list[Use]:
    """x_hat from the running statistics (eval mode) or, opted in, from the batch statistics
    the forward used (see the module docstring) -> dense (N, C)."""
    x = call.args[0]
    if m.training or m.running_mean is None:
        x_hat = F.batch_norm(x, None, None, training=True, eps=m.eps)  # no stats updated
    else:
        x_hat = F.batch_norm(x, m.running_mean, m.running_var, training=False, eps=m.eps)
    return affine_uses(x_hat, call.grad, (m.num_features,), True, m, call.wanted)


def instancenorm_rule(m: nn.modules.instancenorm._InstanceNorm, call: RuleCall) -> list[Use]:
    """x_hat per example and channel (or the running statistics in eval mode when tracked)
    -> dense (N, C)."""
    use_running = not m.training and m.track_running_stats
    x_hat = F.instance_norm(call.args[0], m.running_mean if use_running else None,
                            m.running_var if use_running else None,
                            use_input_stats=not use_running, eps=m.eps)
    return affine_uses(x_hat, call.grad, (m.num_features,), True, m, call.wanted)


for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_t, batchnorm_rule, applies=_channels_first_batched)
for _t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d):
    register_rule(_t, instancenorm_rule, applies=_channels_first_batched)


def is_coupled_batchnorm(m: nn.Module) -> bool:
    """True when a BatchNorm normalises with batch statistics (couples the examples)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and (
        m.training or m.running_mean is None
    )


def _prelu_batch(m: nn.PReLU) -> str:
    return "leading" if m.num_parameters == 1 else "first"


def _prelu_applies(m: nn.PReLU, args: tuple, kwargs: dict) -> bool:
    return m.num_parameters == 1 or (bool(args) and args[0].dim() >= 2)


@register_rule(nn.PReLU, batch=_prelu_batch, applies=_prelu_applies)
def prelu_rule(m: nn.PReLU, call: RuleCall) -> list[Use]:
    """y = max(0, x) + w min(0, x), w per channel (dim 1) or one shared value:
    dw_n = sum of g * min(0, x) over example n's positions (of each channel)."""
    if "weight" not in call.wanted:
        return []
    g, x = call.grad, call.args[0]
    n = g.shape[0]
    gx = g * torch.clamp(x, max=0)
    if m.num_parameters == 1:
        return [("weight", gx.reshape(n, -1).sum(1, keepdim=True))]
    return [("weight", gx.reshape(n, m.num_parameters, -1).sum(2))]
