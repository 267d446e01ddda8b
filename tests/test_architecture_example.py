"""docs/architecture.md's worked example (a new instrument) runs as written, gives the numbers
of the float64 reference, fits the contract, and trains inside the Trainer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from graddyn.instruments import INSTRUMENTS, Probe
from graddyn.reference import per_example_grads

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _example() -> str:
    text = DOC.read_text()
    section = text[text.index("### Worked example: a new instrument"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def example():
    """The block's namespace; its instrument is taken out of the registry afterwards."""
    ns: dict = {}
    try:
        exec(compile(_example(), str(DOC), "exec"), ns)  # noqa: S102 (our own docs)
        yield ns
    finally:
        INSTRUMENTS._items.pop("norm_spread", None)


def test_example_is_short():
    assert len(_example().strip().splitlines()) < 40


def test_example_matches_the_reference(example):
    model, x, y, inst = example["model"], example["x"], example["y"], example["inst"]
    assert INSTRUMENTS.get("norm_spread") is example["NormSpread"]
    per_ex = per_example_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), x, y)
    norms = torch.cat([g.flatten(1) for g in per_ex.values()], 1).double().norm(dim=1)  # (B,)
    got = inst.compute()
    assert got["mean"] == pytest.approx(float(norms.mean()), rel=1e-5)
    assert got["cv"] == pytest.approx(float(norms.std(unbiased=False) / norms.mean()), rel=1e-4)


def test_example_state_merges_and_resets(example):
    cls, probe_args = example["NormSpread"], example
    model, x, y = probe_args["model"], probe_args["x"], probe_args["y"]
    import graddyn

    halves = []
    for rows in (slice(0, 16), slice(16, 32)):
        with graddyn.capture(model) as cap:
            losses = F.cross_entropy(model(x[rows]), y[rows], reduction="none")
        part = cls()
        part.update(Probe(grads=cap.backward(losses)))
        halves.append(part)
    halves[0].merge(halves[1])
    assert halves[0].compute()["mean"] == pytest.approx(example["inst"].compute()["mean"])
    halves[0].reset()
    with pytest.raises(RuntimeError, match="before any update"):
        halves[0].compute()


def test_example_runs_in_the_trainer(example, tmp_path):
    from graddyn.data import load_dataset
    from graddyn.train import Probes, RunStore, Trainer, every

    data = load_dataset("digits")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).float()
    run = RunStore(tmp_path).create("example", config={})
    Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), data, batch_size=32, run=run,
            probes=Probes(instruments=[(example["NormSpread"](), every(2))], size=64)
            ).fit(4)
    steps, values = run.history("norm_spread/cv")
    assert list(steps) == [0, 2, 4] and all(v > 0 for v in values)
