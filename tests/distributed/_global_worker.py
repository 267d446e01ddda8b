"""One rank of ``test_global_batch.py``: ``torchrun --standalone --nproc-per-node 2
_global_worker.py OUT`` (gloo, float64). Each rank captures its share of one global batch
with ``capture(ddp_model, process_group=...)`` and saves what every query and instrument
gives, then trains with DDP and batch instruments; the test compares both ranks with one
process on the whole batch. The cases live here so that the test builds the same ones."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

import graddyn
from graddyn.instruments import (
    GSNR,
    BatchCoherence,
    Coherence,
    Confusion,
    GroupSplit,
    Probe,
    Stiffness,
)
from graddyn.train import Probes, Recording, Trainer, every

B, K = 7, 4
SHARES = (slice(0, 4), slice(4, 7))  # unequal on purpose


class Block(nn.Module):
    """A transformer encoder layer, mean-pooled, and a linear head."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                                batch_first=True)
        self.head = nn.Linear(8, K)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def case(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(model, x, y, groups) of the global batch, the same on every rank."""
    torch.manual_seed(11)
    if name == "mlp":
        model, shape = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, K)), (6,)
    elif name == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Tanh(),
                              nn.Conv2d(4, 4, 3, stride=2), nn.Flatten(), nn.Linear(16, K))
        shape = (2, 6, 6)
    else:
        model, shape = Block(), (5, 8)
    x, y = torch.randn(B, *shape), torch.randint(0, K, (B,))
    return model.double(), x, y, torch.arange(B) % 3 == 0


def summary(grads, losses, targets, groups) -> dict[str, torch.Tensor]:
    """Every query and instrument on one BatchGrads, as float64 tensors."""
    out = {"gram": grads.gram(), "norms": grads.norms()}
    out.update({f"sum/{k}": v for k, v in grads.sum().items()})
    probe = Probe(grads=grads, losses=losses, targets=targets,
                  indices=torch.arange(len(targets)))
    for inst in (Coherence(), BatchCoherence(), Confusion(), Stiffness(K), GSNR(chunk_size=3),
                 GroupSplit(groups, null_worlds=2)):
        inst.update(probe)
        for key, v in inst.compute().items():
            out[f"{inst.name}/{key}"] = torch.as_tensor(v, dtype=torch.float64)
    return out


def data() -> SimpleNamespace:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=g)
    return SimpleNamespace(train_x=x[:48], train_y=y[:48], test_x=x[48:], test_y=y[48:])


def trainer(model: nn.Module) -> Trainer:
    """Global batch 12, momentum, batch instruments on some steps, probes and evaluations."""
    return Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), data(), batch_size=12,
        seed=3, progress=False,
        probes=Probes([(Coherence(), every(4))], size=16, batch_instruments=[
            (Confusion(), every(2)), (GroupSplit(torch.arange(48) % 4 == 0, 1), every(3))]),
        recording=Recording(eval=every(3), checkpoint=None))


def train_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def main(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float64)
    rank = dist.get_rank()
    world = dist.group.WORLD
    results: dict = {}
    for name in ("mlp", "cnn", "transformer"):
        model, x, y, groups = case(name)
        ddp = nn.parallel.DistributedDataParallel(model)
        with graddyn.capture(ddp, process_group=world) as cap:
            losses = F.cross_entropy(ddp(x[SHARES[rank]]), y[SHARES[rank]], reduction="none")
        grads = cap.backward(losses)
        results[name] = summary(grads, cap.gather(losses.detach()), cap.gather(y[SHARES[rank]]),
                                groups)
        results[name + "/exchange"] = grads.exchange
    fit = trainer(nn.parallel.DistributedDataParallel(train_model()))
    try:  # a global batch the ranks cannot share equally
        Trainer(fit.model, fit.optimizer, data(), batch_size=13)
    except ValueError as err:
        results["odd_batch"] = str(err)
    fit.fit(8)
    results["train"] = {"history": fit.history,
                        "weights": {k: v.clone() for k, v in fit.model.module.state_dict().items()}}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
