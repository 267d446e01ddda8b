"""Bytes per step of global-batch instruments under DDP against DDP's own all-reduce (#25).

Two gloo ranks on this machine (``graddyn.distributed.launch``); each captures its half of
the global batch with ``graddyn.capture(ddp_model, process_group=...)`` and reports what the
exchange of its factors (``grads.exchange``) sent. DDP's ring all-reduce of the gradients
sends 2 (W - 1) / W x P x 4 bytes per rank (float32), i.e. P x 4 at W = 2; the all-gather
sends (W - 1) x (buffer + metadata). Byte counts only: no timing.

The first rows are the models of ``tests/distributed/test_global_batch.py`` (float64, a
global batch of 7 split 4 + 3), then real-size float32 models.

Usage::

    .venv/bin/python benchmarks/distributed.py            # the table of docs/benchmarks.md
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import graddyn
from graddyn.distributed import launch
from graddyn.models import build_model
from graddyn.pergrad._distributed import allreduce_bytes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "distributed"))
import _global_worker as tested  # noqa: E402  (the test's cases)

TESTED = {"test-mlp": "test MLP 6-8-4, float64", "test-cnn": "test CNN (2 conv), float64",
          "test-transformer": "test nn.TransformerEncoderLayer d=8, T=5, float64"}
# name -> (model, input (per example), classes, global batch, what)
CASES = {
    "mlp": ("mlp", (1, 28, 28), 10, 100, "paper MLP 784-2048-10 (Chatterjee 2020)"),
    "cnn": ("cnn", (1, 28, 28), 10, 100, "MNIST CNN (2 conv, 2 linear)"),
    "transformer": ("transformer", (64,), 10, 32,
                    "transformer, d=128, 2 blocks, T=64, vocab 1000"),
}


def _build(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    if name in TESTED:
        torch.set_default_dtype(torch.float64)  # as the test runs them
        model, x, y, _ = tested.case(name[5:])
        return model, x, y
    kind, shape, classes, batch, _ = CASES[name]
    torch.manual_seed(0)
    if kind == "transformer":
        model = build_model(kind, shape, classes, vocab_size=1000, d_model=128, num_layers=2)
        x = torch.randint(0, 1000, (batch, *shape))
    else:
        model = build_model(kind, shape, classes, width=2048, depth=1) if kind == "mlp" \
            else build_model(kind, shape, classes)
        x = torch.randn(batch, *shape)
    return model, x, torch.randint(0, classes, (batch,))


def worker(ctx, name: str) -> dict:
    model, x, y = _build(name)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    cut = tested.SHARES[ctx.rank] if name in TESTED else slice(
        ctx.rank * len(y) // ctx.world_size, (ctx.rank + 1) * len(y) // ctx.world_size)
    share = x[cut], y[cut]
    with graddyn.capture(ddp, process_group=dist.group.WORLD) as cap:
        losses = F.cross_entropy(ddp(share[0]), share[1], reduction="none")
    ex = cap.backward(losses, scale=1 / len(y)).exchange
    params = [p for p in model.parameters() if p.requires_grad]
    return {"P": sum(p.numel() for p in params), "ddp": allreduce_bytes(params, ctx.world_size),
            "sent": ex.sent, "buffer": ex.buffer, "metadata": ex.metadata, "dense": ex.dense}


def main() -> None:
    print("| model | P | global batch | DDP all-reduce / rank | exchange / rank (buffer + "
          "metadata) | ratio | sent as per-example gradients |")
    print("|---|---:|---:|---:|---:|---:|---|")
    rows = [(n, tested.B, w) for n, w in TESTED.items()]
    rows += [(n, batch, what) for n, (_, _, _, batch, what) in CASES.items()]
    for name, batch, what in rows:
        r = launch(worker, 2, args=(name,), timeout_s=120, preload=(__name__,))[0]
        dense = ", ".join(r["dense"]) or "none"
        print(f"| {what} | {r['P']:,} | {batch} | {_size(r['ddp'])} | {_size(r['sent'])} "
              f"({r['buffer']:,} + {r['metadata']:,} B) | {r['sent'] / r['ddp']:.3f} | {dense} |")


def _size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n:,.0f} B"


if __name__ == "__main__":
    main()
