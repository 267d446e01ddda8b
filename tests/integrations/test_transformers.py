"""``GraddynCallback`` in a real Hugging Face ``Trainer`` (tiny BERT / GPT-2 built from configs,
CPU, offline): the values equal graddyn's own measured step on the same batches, the
trajectory equals a run without the callback, and the metrics reach the Trainer's logs and
its TensorBoard integration."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from graddyn.instruments import BatchCoherence, Confusion, Probe  # noqa: E402
from graddyn.integrations.transformers import GraddynCallback, per_example_loss  # noqa: E402
from graddyn.train import at, every, measured_backward  # noqa: E402
from graddyn.train._probes import measure  # noqa: E402

B, T, STEPS = 4, 6, 4


class Logits(torch.nn.Module):
    """A Hugging Face classifier as graddyn's loop calls models: ``model(x) -> logits``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=16, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg).float()


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg).float()


def _dataset(lm=False, n=16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (n, T), generator=g)
    labels = ids.clone() if lm else torch.randint(0, 3, (n,), generator=g)
    if lm:
        labels[::3, -2:] = -100  # padding-like tokens that do not count
    return [{"input_ids": i, "labels": y} for i, y in zip(ids, labels)]


def _train(tmp_path, model, cb=None, lm=False, accumulate=1, report_to="none", **kw):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=B,
        learning_rate=0.1, lr_scheduler_type="constant", max_grad_norm=0.0, use_cpu=True,
        save_strategy="no", report_to=report_to, logging_steps=100, disable_tqdm=True,
        gradient_accumulation_steps=accumulate, seed=0, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(lm),
                                   optimizers=(opt, None))
    seen = []  # the training batches, to replay them in graddyn's own loop
    model.register_forward_pre_hook(
        lambda m, a, k: seen.append((k["input_ids"].clone(), k["labels"].clone())),
        with_kwargs=True)
    if cb is not None:
        cb.attach(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return trainer, seen


def _instruments():
    return [(BatchCoherence(), every(1)), (Confusion(), at([2, 4]))]


def test_values_equal_graddyns_measured_step_on_the_same_batches(tmp_path):
    torch.set_default_dtype(torch.float32)
    cb = GraddynCallback(_instruments())
    model = _bert()
    trainer, seen = _train(tmp_path, model, cb)
    # graddyn's own loop on the recorded batches, from the same initial weights
    ref = _bert()
    logits = Logits(ref)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    insts, want = _instruments(), {}
    for step, (ids, y) in enumerate(seen, start=1):
        losses, grads, out = measured_backward(
            logits, lambda o, t: F.cross_entropy(o, t, reduction="none"), ids, y, write=False)
        due = [i for i, s in insts if s(step)]
        scalars, _ = measure(due, [Probe(grads=grads, losses=losses, targets=y, step=step - 1)])
        want.update({(step, "graddyn/" + k): v for k, v in scalars.items()})
        grads.write_grad(scale=1 / len(y), overwrite=True)
        opt.step()
    got = {(s, n): v for s, n, v in cb.history}
    assert sorted(got) == sorted(want) and len(seen) == STEPS
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    logged = {e["step"]: e for e in trainer.state.log_history if "loss" in e}
    assert sorted(logged) == [1, 2, 3, 4]  # a measured step is logged at that step
    assert logged[2]["graddyn/confusion/eta"] == got[(2, "graddyn/confusion/eta")]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_language_model_trajectory_is_the_plain_trainers(tmp_path, accumulate):
    """Causal LM with ignored tokens, with and without gradient accumulation: the weights
    after training equal those of the same Trainer without the callback."""
    torch.set_default_dtype(torch.float32)
    plain = _gpt2()
    _train(tmp_path / "plain", plain, lm=True, accumulate=accumulate)
    model, cb = _gpt2(), GraddynCallback([(BatchCoherence(), every(1))])
    _train(tmp_path / "cb", model, cb, lm=True, accumulate=accumulate)
    assert [s for s, n, _ in cb.history if n.endswith("alpha")] == [1, 2, 3, 4]
    for a, b in zip(plain.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_metrics_reach_the_tensorboard_integration(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.set_default_dtype(torch.float32)
    _train(tmp_path, _bert(), GraddynCallback([(BatchCoherence(), every(2))]),
           report_to="tensorboard")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tag = next(t for t in acc.Tags()["scalars"] if "batch_coherence/alpha" in t)
    assert [e.step for e in acc.Scalars(tag)] == [2, 4]


def test_refusals_name_the_fix(tmp_path):
    cb = GraddynCallback([(Confusion(), every(1))])
    args = SimpleNamespace(fp16=True, deepspeed=None, fsdp="", n_gpu=1)
    with pytest.raises(ValueError, match="use bf16=True"):
        cb.on_train_begin(args, None, None, model=_bert())
    with pytest.raises(ValueError, match="per_example_loss does not know logits"):
        per_example_loss(_bert(), {"logits": torch.zeros(2, 3)}, {"labels": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="needs the model's logits and the batch's labels"):
        per_example_loss(_bert(), {"logits": torch.zeros(2, 3)}, {})
    torch.set_default_dtype(torch.float32)
    wrong = GraddynCallback([(Confusion(), every(1))],
                            per_example_loss=lambda m, o, i: 2 * per_example_loss(m, o, i))
    with pytest.raises(ValueError, match="pass per_example_loss= matching the model's loss"):
        _train(tmp_path, _bert(), wrong)


def test_a_model_without_labels_is_refused(tmp_path):
    torch.set_default_dtype(torch.float32)
    cb = GraddynCallback([(Confusion(), every(1))])
    model = _bert()
    cb.meter.begin_step(1, False)
    cb._arm(model)
    with pytest.raises(ValueError, match="needs the batch's 'labels' to reach the model"):
        model(input_ids=torch.randint(0, 50, (B, T)))  # no labels: the model computes no loss
    cb.on_train_end(None, None, None)


def test_missing_transformers_is_named(monkeypatch):
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "graddyn.integrations.transformers")
    with pytest.raises(ImportError, match="pip install transformers accelerate"):
        importlib.import_module("graddyn.integrations.transformers")
