"""Checkpoints: validation, and the round trip through the run store's trainer checkpoints."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from graddyn.influence import TracIn, check_checkpoints, checkpoints_from_run
from graddyn.train import Recording, RunStore, Trainer, at_end, every


def _model():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))


def _data(n=24):
    x = torch.randn(n, 3)
    return SimpleNamespace(train_x=x, train_y=(x[:, 0] > 0).long(), test_x=x[:4],
                           test_y=(x[:4, 0] > 0).long())


def test_round_trip_through_run_store(tmp_path):
    run = RunStore(tmp_path).create("r", {})
    model, data = _model(), _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    trainer = Trainer(
        model, opt, data, batch_size=8, run=run, lr_scheduler=sched, progress=False,
        recording=Recording(checkpoint=every(2, start=2) | at_end, loss=None))
    trainer.fit(6)
    ckpts = checkpoints_from_run(run)
    assert [lr for _, lr in ckpts] == [0.4, 0.2, 0.1]  # lr in effect after steps 2, 4, 6
    final = ckpts[-1][0]
    assert all(torch.equal(final[k], v) for k, v in model.state_dict().items())
    picked = checkpoints_from_run(run, steps=[4])
    assert len(picked) == 1 and picked[0][1] == 0.2
    x, y = data.train_x, data.train_y
    manual = [(run.load_checkpoint(p)["model"], run.load_checkpoint(p)["lr"])
              for _, p in run.checkpoints()]
    torch.testing.assert_close(TracIn(model, ckpts).scores(x, y, x[:3], y[:3]),
                               TracIn(model, manual).scores(x, y, x[:3], y[:3]))


def test_run_without_checkpoints(tmp_path):
    run = RunStore(tmp_path).create("empty", {})
    with pytest.raises(ValueError, match="has no checkpoints; train it with"):
        checkpoints_from_run(run)
    with pytest.raises(ValueError, match="tag 'a' of run 'empty' has no checkpoints"):
        checkpoints_from_run(run, tag="a")


def test_unknown_steps_and_foreign_checkpoints(tmp_path):
    run = RunStore(tmp_path).create("r", {})
    run.save_checkpoint(5, {"weights": _model().state_dict()})
    with pytest.raises(ValueError, match=r"no checkpoint at steps \[7\]; available steps: \[5\]"):
        checkpoints_from_run(run, steps=[7])
    with pytest.raises(ValueError, match="lacks 'model' or 'lr'"):
        checkpoints_from_run(run)


@pytest.mark.parametrize(("ckpts", "match"), [
    ([], "no checkpoints: pass a list of"),
    ([{"a": 1}], "must be a \\(state_dict, lr\\) pair"),
    ([("state", 0.1)], "must be a \\(state_dict, lr\\) pair"),
    ([(None, 0.1, 3)], "must be a \\(state_dict, lr\\) pair"),
])
def test_bad_checkpoint_lists(ckpts, match):
    with pytest.raises(ValueError, match=match):
        check_checkpoints(ckpts, _model())


@pytest.mark.parametrize("lr", [0.0, -0.1, math.nan, math.inf, True, "0.1", None])
def test_bad_learning_rates(lr):
    model = _model()
    with pytest.raises(ValueError, match="positive learning rate"):
        TracIn(model, [(model.state_dict(), lr)])


def test_state_dict_must_match_the_model():
    model = _model()
    state = dict(model.state_dict())
    state["extra"] = state.pop("0.weight")
    with pytest.raises(ValueError, match=r"missing keys \['0.weight'\], unexpected keys "
                                         r"\['extra'\]"):
        TracIn(model, [(state, 0.1)])


def test_int_lr_is_accepted():
    model = _model()
    assert check_checkpoints([(model.state_dict(), 1)], model)[0][1] == 1.0
