"""``graddyn.pergrad._im2col.patches`` is ``F.unfold``'s (N, Cin k, L) layout for every padding,
stride and dilation option (Conv1d checked as a (1, k) Conv2d)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from graddyn.pergrad._im2col import pad_input, patches


@pytest.mark.parametrize("kw", [
    {}, {"stride": 2}, {"padding": 1}, {"padding": "same"}, {"dilation": 2, "padding": 2},
    {"padding": 1, "padding_mode": "reflect"}, {"stride": (2, 1), "padding": (0, 1)},
])
def test_conv2d_patches_equal_unfold(kw):
    m = nn.Conv2d(3, 4, 3, **kw)
    x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    xp = pad_input(m, x)
    want = F.unfold(xp, m.kernel_size, dilation=m.dilation, stride=m.stride)
    got = patches(m, x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_conv1d_patches_equal_unfold_of_a_2d_view():
    m = nn.Conv1d(2, 3, 4, stride=2, padding=3, dilation=2)
    x = torch.randn(3, 2, 17, dtype=torch.float64)
    xp = pad_input(m, x)[:, :, None]
    want = F.unfold(xp, (1, 4), dilation=(1, 2), stride=(1, 2))
    torch.testing.assert_close(patches(m, x), want, rtol=0, atol=0)
