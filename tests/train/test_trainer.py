from types import SimpleNamespace
from typing import ClassVar

import pytest
import torch
from torch import nn

from graddyn.instruments import Instrument
from graddyn.train import (
    Event,
    NonFiniteLossError,
    OnEvent,
    Probes,
    Recording,
    RunStore,
    Trainer,
    at,
    at_end,
    every,
    per_example_cross_entropy,
)


def make_data(n=24, d=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 8, d, generator=g)
    y = (x[:, 0] > 0).long()
    return SimpleNamespace(train_x=x[:n], train_y=y[:n], test_x=x[n:], test_y=y[n:])


def make_model(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Dropout(dropout), nn.Linear(4, 2))


class LoopGrads:
    """Per-example gradients by a plain loop: the probe engine stand-in for these tests."""

    def __init__(self, model, losses):
        params = [p for p in model.parameters()]
        rows = [torch.cat([g.flatten() for g in torch.autograd.grad(l, params,
                                                                    retain_graph=True)])
                for l in losses]
        self.g = torch.stack(rows)  # (B, P)

    def norms(self):
        return self.g.norm(dim=1)


class CountingBackward:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, loss_fn, x, y):
        self.calls += 1
        out = model(x)
        losses = loss_fn(out, y)
        return LoopGrads(model, losses), losses.detach(), out.detach()


class MeanNorm(Instrument):
    name: ClassVar[str] = "mean_norm"
    needs_grads: ClassVar[bool] = True

    def __init__(self, name="mean_norm"):
        self.name = name
        self.reset()

    def update(self, probe):
        self.vals.append(probe.grads.norms())

    def compute(self):
        return {"value": torch.cat(self.vals).mean(), "all": torch.cat(self.vals)}

    def reset(self):
        self.vals = []


class MeanLossInst(Instrument):
    name: ClassVar[str] = "probe_loss"
    needs_grads: ClassVar[bool] = False

    def update(self, probe):
        self.total = self.total + float(probe.losses.sum())
        self.n = self.n + len(probe.losses)

    def compute(self):
        return {"mean": self.total / self.n}

    def reset(self):
        self.total, self.n = 0.0, 0


def test_default_rule_is_plain_minibatch_sgd():
    data = make_data()
    model, ref = make_model(), make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    Trainer(model, opt, data, batch_size=8, seed=3, progress=False).fit(5)
    ropt = torch.optim.SGD(ref.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    steps = 0
    while steps < 5:
        perm = torch.randperm(24, generator=g)
        for b in range(3):
            if steps == 5:
                break
            idx = perm[b * 8 : (b + 1) * 8]
            ropt.zero_grad()
            per_example_cross_entropy(ref(data.train_x[idx]), data.train_y[idx]).mean().backward()
            ropt.step()
            steps += 1
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


class Recorder:
    def __init__(self):
        self.events = []

    def match(self, event, state):
        return True

    def apply(self, event, state):
        self.events.append((event, state.step, state.epoch))


def test_events_fire_in_loop_order():
    rec = Recorder()
    model = make_model()
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(n=16), batch_size=8,
            interventions=[rec], progress=False).fit(3)
    names = [e for e, _, _ in rec.events]
    per_step = [Event.BATCH_START, Event.AFTER_BACKWARD, Event.AFTER_STEP, Event.BATCH_END]
    assert names == [Event.FIT_START, Event.EPOCH_START, *per_step, *per_step, Event.EPOCH_END,
                     Event.EPOCH_START, *per_step, Event.FIT_END]
    assert rec.events[-1][1:] == (3, 1)  # step 3, one completed epoch


def test_after_backward_transform_and_after_step_intervention():
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]

    def zero_grads(st):
        for p in st.model.parameters():
            p.grad.zero_()

    seen = []
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(), batch_size=8,
            interventions=[OnEvent(Event.AFTER_BACKWARD, zero_grads),
                           OnEvent(Event.AFTER_STEP, lambda st: seen.append(st.step), every(2))],
            progress=False).fit(5)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert seen == [2, 4]


def test_custom_gradient_rule_and_logged_losses():
    class HalfRule:  # the batch gradient of half the loss
        def __call__(self, model, loss_fn, batch):
            losses = loss_fn(model(batch.x), batch.y)
            (0.5 * losses.mean()).backward()
            return losses.detach()

    data = make_data()
    a, b = make_model(), make_model()
    ta = Trainer(
        a, torch.optim.SGD(a.parameters(), lr=0.2), data, batch_size=8, gradient=HalfRule(),
        progress=False)
    ta.fit(3)
    Trainer(b, torch.optim.SGD(b.parameters(), lr=0.1), data, batch_size=8,
            progress=False).fit(3)
    assert all(torch.allclose(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert [s for s, n, _ in ta.history if n == "train/batch_loss"] == [1, 2, 3]


def test_probe_backward_runs_once_per_probe_batch_and_is_shared(tmp_path):
    backward = CountingBackward()
    model = make_model()
    run = RunStore(tmp_path).create("r", {})
    Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(), batch_size=8, run=run,
        progress=False,
        probes=Probes([(MeanNorm("a"), every(2)), (MeanNorm("b"), every(2)),
                       (MeanLossInst(), at([1]))], size=10, batch_size=5, backward=backward),
    ).fit(4)
    assert backward.calls == 3 * 2  # steps 0, 2, 4 x two probe chunks; step 1 needs no grads
    steps, vals = run.history("a/value")
    assert steps.tolist() == [0, 2, 4] and torch.allclose(
        torch.tensor(vals), torch.tensor(run.history("b/value")[1]))
    assert run.history("probe_loss/mean")[0].tolist() == [1]
    assert run.load_array("a/all", step=2).shape == (10,)  # non-scalar results are arrays


def test_eval_metrics_classification_and_regression():
    model = make_model()
    tr = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(), batch_size=8,
        progress=False, recording=Recording(eval=every(2) | at_end))
    tr.fit(3)
    names = {(s, n) for s, n, _ in tr.history}
    assert {(0, "train/acc"), (2, "test/loss"), (3, "test/acc")} <= names
    assert (1, "train/acc") not in names
    reg = nn.Linear(3, 1)
    data = make_data()
    data.train_y = data.train_x.sum(1, keepdim=True)
    data.test_y = data.test_x.sum(1, keepdim=True)
    mse = lambda out, y: ((out - y) ** 2).sum(1)  # noqa: E731
    out = Trainer(reg, torch.optim.SGD(reg.parameters(), lr=0.1), data, batch_size=8,
                  loss_fn=mse, progress=False).evaluate()
    assert set(out) == {"train/loss", "test/loss"}


def test_nonfinite_loss_names_the_step_after_recording(tmp_path):
    run = RunStore(tmp_path).create("r", {})
    model = make_model()

    def blow_up(st):
        if st.step == 2:
            with torch.no_grad():
                st.model[0].weight.fill_(float("inf"))

    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(), batch_size=8,
                 run=run, interventions=[OnEvent(Event.AFTER_STEP, blow_up)], progress=False)
    with pytest.raises(NonFiniteLossError, match="not finite at step 3.*up to step 2"):
        tr.fit(5)
    assert run.history("train/batch_loss")[0].tolist() == [1, 2]


@pytest.mark.parametrize(
    "kwargs, exc, msg",
    [
        ({"batch_size": 100}, ValueError, "between 1 and the training set size 24"),
        ({"batch_size": 0}, ValueError, "between 1"),
        ({"probes": Probes([MeanLossInst()])}, TypeError, r"\(instrument, schedule\) pairs"),
    ],
    ids=["batch-too-big", "batch-zero", "instrument-not-pair"],
)
def test_bad_arguments(kwargs, exc, msg):
    model = make_model()
    with pytest.raises(exc, match=msg):
        Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(),
                **{"batch_size": 8, **kwargs})


def test_loss_fn_must_be_per_example():
    model = make_model()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(), batch_size=8,
                 loss_fn=torch.nn.functional.cross_entropy, progress=False)
    with pytest.raises(ValueError, match="reduction='none'"):
        tr.fit(1)


def _train(run, steps, ckpt, seed=0, tag=""):
    model = make_model(seed=seed + 11, dropout=0.2)  # a fresh init; resume must overwrite it
    torch.manual_seed(seed + 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    tr = Trainer(
        model, opt, make_data(n=20), batch_size=6, seed=seed, run=run, tag=tag, lr_scheduler=sched,
        progress=False, probes=Probes([(MeanLossInst(), every(3))]),
        recording=Recording(eval=every(4), checkpoint=ckpt))
    tr.fit(steps)
    return model


def _all_metrics(run):
    return {n: run.history(n) for n in run.metric_names()}


def test_resume_matches_uninterrupted_run_bit_for_bit(tmp_path):
    store = RunStore(tmp_path)
    ref_run = store.create("ref", {})
    ref = _train(ref_run, 17, every(5) | at_end)
    run = store.create("cut", {})
    _train(run, 13, every(5))  # "killed" after step 13; latest checkpoint at step 10
    assert run.history("train/batch_loss")[0].max() == 13
    resumed = _train(run, 17, every(5) | at_end)
    for p, q in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    a, b = _all_metrics(ref_run), _all_metrics(run)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0].tolist() == b[name][0].tolist(), name
        assert a[name][1].tobytes() == b[name][1].tobytes(), name


def test_checkpoints_store_learning_rate_and_tags_separate_trainers(tmp_path):
    run = RunStore(tmp_path).create("r", {})
    _train(run, 9, every(4) | at_end, tag="first")
    _train(run, 5, at_end, tag="second")
    ckpts = run.checkpoints("first")
    assert [s for s, _ in ckpts] == [0, 4, 8, 9]
    lrs = [run.load_checkpoint(p)["lr"] for _, p in ckpts]
    assert lrs == [0.1, 0.05, 0.025, 0.025]
    assert run.latest_checkpoint("second")[0] == 5
    assert "first/train/batch_loss" in run.metric_names()
    assert "second/probe_loss/mean" in run.metric_names()


def test_checkpoint_past_max_steps_is_refused(tmp_path):
    run = RunStore(tmp_path).create("r", {})
    _train(run, 6, at_end)
    with pytest.raises(ValueError, match="past max_steps=4"):
        _train(run, 4, at_end)


def test_second_fit_continues_the_step_count():
    model = make_model()
    tr = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), make_data(), batch_size=8,
                 progress=False)
    tr.fit(2)
    assert tr.fit(5).step == 5
    assert [s for s, n, _ in tr.history if n == "train/batch_loss"] == [1, 2, 3, 4, 5]


class FirstLearned(Instrument):
    """Accumulates over the whole run: first probe step each example was classified right."""

    name: ClassVar[str] = "first_learned"
    needs_grads: ClassVar[bool] = False
    accumulates = True

    def __init__(self):
        self.reset()

    def update(self, probe):
        right = probe.outputs.argmax(1) == probe.targets
        new = right & (self.first[probe.indices] < 0)
        self.first[probe.indices[new]] = probe.step

    def compute(self):
        return {"fraction": (self.first >= 0).double().mean()}

    def reset(self):
        self.first = torch.full((24,), -1)

    def state_dict(self):
        return {"first": self.first.clone()}

    def load_state_dict(self, d):
        self.first = d["first"].clone()


def test_accumulating_instrument_survives_resume(tmp_path):
    def train(run, steps, ckpt):
        model = make_model(seed=5)
        inst = FirstLearned()
        Trainer(
            model, torch.optim.SGD(model.parameters(), lr=0.5), make_data(), batch_size=8, run=run,
            progress=False, probes=Probes([(inst, every(1))], size=24),
            recording=Recording(checkpoint=ckpt)).fit(steps)
        return inst

    store = RunStore(tmp_path)
    ref = train(store.create("ref", {}), 12, at_end)
    run = store.create("cut", {})
    train(run, 7, every(5))
    resumed = train(run, 12, at_end)
    assert torch.equal(ref.first, resumed.first)
    assert run.history("first_learned/fraction")[1].tolist() == \
        store.open("ref").history("first_learned/fraction")[1].tolist()


def test_default_engine_is_graddyn_capture():
    pergrad = pytest.importorskip("graddyn.pergrad")
    if not hasattr(pergrad, "capture"):
        pytest.skip("graddyn.pergrad.capture not available yet")
    from graddyn.train import capture_backward

    model = make_model()
    data = make_data()
    grads, losses, outputs = capture_backward(model, per_example_cross_entropy,
                                            data.train_x[:5], data.train_y[:5])
    ref = LoopGrads(model, per_example_cross_entropy(model(data.train_x[:5]),
                                                     data.train_y[:5]))
    assert losses.shape == (5,) and outputs.shape == (5, 2)
    assert torch.allclose(grads.norms(), ref.norms())
    assert all(p.grad is None for p in model.parameters())
