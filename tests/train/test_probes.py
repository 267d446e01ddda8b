"""Probing measures the model without changing it."""

import torch
from torch import nn

from graddyn.instruments import Instrument, Probe
from graddyn.train._probes import ProbeRunner, capture_backward, preserved_buffers


class _MeanLoss(Instrument):
    name = "mean_loss"
    needs_grads = False

    def __init__(self) -> None:
        self.total, self.n = 0.0, 0

    def update(self, probe: Probe) -> None:
        self.total += float(probe.losses.sum())
        self.n += len(probe.losses)

    def compute(self) -> dict:
        return {"value": self.total / self.n}

    def reset(self) -> None:
        self.total, self.n = 0.0, 0


def _ce(out, y):
    return nn.functional.cross_entropy(out, y, reduction="none")


def test_probe_in_train_mode_leaves_batchnorm_statistics_unchanged():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    runner = ProbeRunner([(_MeanLoss(), lambda s: True)], torch.arange(16), 8, capture_backward)
    scalars, _ = runner.run(0, False, model, _ce, x, y)
    assert "mean_loss/value" in scalars
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the same forward outside the guard does move the statistics: the test could fail
    model(x)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


def test_preserved_buffers_restores_after_an_error():
    model = nn.BatchNorm1d(3).train()
    try:
        with preserved_buffers(model):
            model(torch.randn(5, 3))
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert torch.equal(model.running_mean, torch.zeros(3))
    assert int(model.num_batches_tracked) == 0
