"""``GraddynCallback`` in a real Lightning ``Trainer`` (tiny MLP, CPU, offline): the values it
logs equal graddyn's own ``Trainer(probes=Probes(batch_instruments=...))`` on the same
batches, it reaches Lightning's loggers, and the trajectory is plain SGD's."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

L = pytest.importorskip("lightning.pytorch")

from graddyn.instruments import BatchCoherence, Coherence, Confusion, Stiffness  # noqa: E402
from graddyn.integrations.lightning import GraddynCallback  # noqa: E402
from graddyn.train import Probes, Recording, Trainer, at, at_end, every  # noqa: E402

N, B, STEPS = 40, 8, 7


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=g)
    return SimpleNamespace(train_x=x, train_y=torch.randint(0, 3, (N,), generator=g))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def _instruments():
    return [(BatchCoherence(), every(1)), (Confusion(), at([2, 5])),
            (Stiffness(num_classes=3), every(3) | at_end)]


class Net(L.LightningModule):
    def __init__(self, output: str = "dict"):
        super().__init__()
        self.net = _model()
        self.output = output

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        losses = F.cross_entropy(self(x), y, reduction="none")
        if self.output == "scalar":
            return losses.mean()
        if self.output == "sum":
            return {"loss": losses.sum(), "losses": losses}
        return {"loss": losses.mean(), "losses": losses, "targets": y}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer_order(n_steps, batch):
    """The index batches graddyn's Trainer draws (seed 0): one permutation per epoch."""
    gen, out = torch.Generator().manual_seed(0), []
    while len(out) < n_steps:
        perm = torch.randperm(N, generator=gen)
        out += [perm[i * batch:(i + 1) * batch].tolist() for i in range(N // batch)]
    return out[:n_steps]


def _fit(tmp_path, net, cb, steps=STEPS, batch=B, accumulate=1, **kw):
    data = _data()
    ds = torch.utils.data.TensorDataset(data.train_x, data.train_y)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=_trainer_order(steps * accumulate,
                                                                         batch))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=[cb],
                        logger=L.loggers.CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        accumulate_grad_batches=accumulate, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers, log_every_n_steps, ...
        trainer.fit(net, loader)
    return trainer


def _graddyn_loop(batch=B, steps=STEPS):
    model = _model()
    tr = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), batch_size=batch,
        progress=False, probes=Probes(batch_instruments=_instruments()),
        recording=Recording(checkpoint=None, loss=None))
    tr.fit(steps)
    return model, {(s, "graddyn/" + n): v for s, n, v in tr.history}


def test_values_equal_graddyns_own_loop_and_reach_the_loggers(tmp_path):
    torch.set_default_dtype(torch.float32)
    net, cb = Net(), GraddynCallback(_instruments())
    trainer = _fit(tmp_path, net, cb)
    model, want = _graddyn_loop()
    got = {(s, n): v for s, n, v in cb.history}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    steps = sorted({s for s, n in got if n == "graddyn/confusion/eta"})
    assert steps == [2, 5]  # schedules of the optimizer step, as in graddyn's loop
    assert sorted({s for s, n in got if n.startswith("graddyn/stiffness")}) == [3, 6, 7]
    for a, b in zip(model.parameters(), net.net.parameters()):  # the same SGD trajectory
        torch.testing.assert_close(a, b)
    csv = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "graddyn/batch_coherence/alpha" in csv.splitlines()[0]
    # the fit is over: the module's own methods are back, the capture's hooks are gone
    assert "backward" not in vars(net) and "training_step" not in vars(net)
    assert not any(m._forward_hooks for m in net.modules())
    del trainer


def test_accumulated_micro_batches_form_one_measurement(tmp_path):
    """Two micro-batches of 4 per step stream into one measurement: for a streaming
    instrument graddyn's loop on the batches of 8 gives the same values (and the same
    trajectory)."""
    torch.set_default_dtype(torch.float32)
    net, cb = Net(), GraddynCallback([(Coherence(within=False), every(1))])
    _fit(tmp_path, net, cb, steps=3, batch=4, accumulate=2)
    model = _model()
    tr = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), _data(), batch_size=8, progress=False,
        probes=Probes(batch_instruments=[(Coherence(within=False), every(1))]),
        recording=Recording(checkpoint=None, loss=None))
    tr.fit(3)
    got = {(s, n): v for s, n, v in cb.history}
    for s, n, v in tr.history:
        assert got[(s, "graddyn/" + n)] == pytest.approx(v, rel=1e-5), (s, n)
    for a, b in zip(model.parameters(), net.net.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("output, match", [
    ("scalar", "return {'loss': losses.mean\\(\\), 'losses': losses}"),
    ("sum", "'loss' must be losses.mean\\(\\)"),
])
def test_training_step_without_per_example_losses_is_refused(tmp_path, output, match):
    torch.set_default_dtype(torch.float32)
    with pytest.raises(ValueError, match=match):
        _fit(tmp_path, Net(output=output), GraddynCallback([(Confusion(), every(1))]), steps=1)


def test_refusals_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="no instruments to measure"):
        GraddynCallback([])
    cb = GraddynCallback([(Confusion(), every(1))])
    manual = SimpleNamespace(automatic_optimization=False)
    with pytest.raises(ValueError, match="measured_backward in your training_step"):
        cb.on_train_start(SimpleNamespace(), manual)
    scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()),
                             precision="16-mixed")
    with pytest.raises(ValueError, match="use precision='bf16-mixed'"):
        cb.on_train_start(scaled, SimpleNamespace(automatic_optimization=True))


def test_per_example_losses_of_the_wrong_shape_and_a_rescaled_loss_are_refused():
    from graddyn.integrations.lightning import _check_output

    with pytest.raises(ValueError, match="must be a \\(B,\\) tensor of per-example losses"):
        _check_output({"loss": torch.tensor(1.0), "losses": torch.ones(2, 2)})
    cb = GraddynCallback([(Confusion(), every(1))])
    cb._trainer = SimpleNamespace(accumulate_grad_batches=1)
    cb.meter.armed = True
    cb._out = {"loss": torch.tensor(2.0), "losses": torch.tensor([1.0, 3.0])}
    backward = cb._backward(lambda loss: None)
    with pytest.raises(ValueError, match="did a plugin rescale it"):
        backward(torch.tensor(4.0))  # e.g. a loss scaler multiplied it


def test_missing_lightning_is_named(monkeypatch):
    import importlib
    import sys

    for name in ("lightning", "lightning.pytorch", "pytorch_lightning",
                 "graddyn.integrations.lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "graddyn.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'graddyn\[lightning\]'"):
        importlib.import_module("graddyn.integrations.lightning")
