"""The instruments on the real engine's BatchGrads agree with the dense reference."""

import pytest
import torch
from torch import nn

from graddyn.instruments import INSTRUMENTS, Probe

from ._dense import dense_batch, random_batch, tiny_mlp

pergrad = pytest.importorskip("graddyn.pergrad")


@pytest.mark.parametrize("name", ["coherence", "confusion", "stiffness", "gsnr", "group_split"])
def test_engine_and_dense_agree(name):
    model = tiny_mlp()
    x, y = random_batch(7)
    kw = {"corrupt": torch.arange(7) % 2 == 0} if name == "group_split" else {}
    with pergrad.capture(model) as cap:
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
    rows = torch.arange(7)
    fast = Probe(grads=cap.backward(losses), targets=y, indices=rows)
    slow = Probe(grads=dense_batch(model, x, y), targets=y, indices=rows)
    a, b = INSTRUMENTS.get(name)(**kw), INSTRUMENTS.get(name)(**kw)
    a.update(fast)
    b.update(slow)
    ra, rb = a.compute(), b.compute()
    for k, v in rb.items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(ra[k].double(), v.double(), equal_nan=True), k
        else:
            assert ra[k] == pytest.approx(v, rel=1e-8, nan_ok=True), k
