"""The README's own-loop example runs as written (on digits), so the front page cannot rot."""

import re
from pathlib import Path

import torch
from torch import nn

from graddyn.data import load_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_training_loop_example_runs(capsys):
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    d = load_dataset("digits")
    torch.set_default_dtype(torch.float32)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    namespace = {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
        "loader": [(d.train_x[i : i + 50], d.train_y[i : i + 50]) for i in range(0, 200, 50)],
    }
    before = model[1].weight.detach().clone()
    exec(compile(block, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 4  # one line per step: step, m-coherence, min cosine
    # m-coherence = |sum g|^2 / sum |g|^2 is positive
    assert all(float(line.split()[1]) > 0 for line in printed)
    assert not torch.equal(before, model[1].weight)  # it trained


def test_readme_model_section_snippets_run(capsys, recwarn):
    """Every python block of "Which models it runs on" runs as written, without falling back."""
    text = README.read_text()
    section = text[text.index("## Which models it runs on"):]
    section = section[: section.index("\n## ", 4)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "torch.Size([5])" in capsys.readouterr().out
    import graddyn

    assert not [w for w in recwarn if issubclass(w.category, graddyn.pergrad.ExactPathWarning)]


def test_readme_lightning_and_hugging_face_snippets_run(capsys, tmp_path, monkeypatch):
    """Every python block of "Use it from Lightning / Hugging Face" runs as written (in a
    scratch folder: they write logs there)."""
    import warnings

    import pytest

    pytest.importorskip("lightning")
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    torch.set_default_dtype(torch.float32)
    text = README.read_text()
    section = text[text.index("## Use it from Lightning / Hugging Face"):]
    section = section[: section.index("\n## ", 4)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the frameworks' advice on workers and log intervals
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("20 ") for line in printed)  # alpha at each of the 20 steps
    float(printed[-1])  # the Hugging Face block prints eta at step 10
    assert list((tmp_path / "logs").rglob("metrics.csv"))


def test_readme_ddp_snippet_runs_in_a_group_of_one(tmp_path):
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    import graddyn
    from graddyn.instruments import Probe

    text = README.read_text()
    section = text[text.index("## Beyond one process"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "s"), 1), rank=0,
                            world_size=1)
    try:
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        x, y = torch.randn(5, 4), torch.randint(0, 2, (5,))
        namespace = {"DistributedDataParallel": DistributedDataParallel, "graddyn": graddyn,
                     "F": F, "Probe": Probe, "model": model, "x": x, "y": y,
                     "global_batch": 5}
        exec(compile(block, "README.md", "exec"), namespace)
    finally:
        dist.destroy_process_group()
    probe = namespace["probe"]
    assert probe.grads.gram().shape == (5, 5) and torch.equal(probe.targets, y)
    want = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for p, w in zip(model.parameters(), want):  # write_grad(): the mean gradient
        torch.testing.assert_close(p.grad, w)
