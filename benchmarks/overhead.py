"""Overhead of gradient-agreement instruments measured every training step (issue 3).

The paper's MLP (784 -> 2048 ReLU -> 10, Chatterjee ICLR 2020), SGD lr 0.1, batch 100, on the
embedded mnist-subset, with coherence, confusion and stiffness measured on *every* step's
training batch, against plain training, in one process. Three modes, interleaved per repeat:

* ``plain``     - ``Trainer`` with the default ``MeanLoss`` step, no instruments;
* ``reused``    - ``Probes(batch_instruments=...)``: the training forward is captured
                  (``graddyn.train.measured_backward``); one backward to the layer outputs
                  gives ``p.grad`` (the factors' mean) and the Gram the three instruments share;
* ``probe``     - the trainer's probe path: instruments every step on a 100-example probe
                  set, i.e. a second forward + per-example backward after each step.

Target (issue 3): ``reused`` <= 1.3 x ``plain`` (Cockpit's "economy" instruments: 4.25x on an
MNIST MLP on a GPU). Wall time is the median and min over ``--repeats`` (modes interleaved),
with process CPU time beside it: on a shared machine the CPU-time ratio is the steadier one.
``--profile`` prints where ``reused`` and ``probe`` spend their time (cProfile, cumulative
seconds of selected functions).

``--chunk 20`` lets the modes take turns every 20 steps inside each repeat, so that all
three see the same drift of a shared machine's speed (the steadier protocol here); the
ratio of each repeat is printed too.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/overhead.py --steps 200 --repeats 5
    .venv/bin/python benchmarks/overhead.py --steps 400 --repeats 5 --chunk 20
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time

import torch

from graddyn.data import load_dataset
from graddyn.instruments import BatchCoherence, Confusion, Stiffness
from graddyn.models import build_model
from graddyn.train import Probes, Recording, Trainer, every

MODES = ("plain", "reused", "probe")
# label -> (file suffix, function) frames whose cumulative time --profile sums
PROFILED = {
    "measured backward": [("_measured.py", "measured_backward")],
    "captured backward": [("_capture.py", "backward")],
    "Gram (ghost)": [("_paramgrads.py", "self_grams")],
    "mean gradient": [("_batchgrads.py", "sum")],
    "coherence": [("coherence.py", "update"), ("coherence.py", "compute")],
    "confusion": [("confusion.py", "update"), ("confusion.py", "compute")],
    "stiffness": [("stiffness.py", "update"), ("stiffness.py", "compute")],
    "probe runner": [("_probes.py", "run")],
    "plain MeanLoss step": [("_rules.py", "__call__")],
    "optimizer step": [("sgd.py", "step")],
}


def instruments() -> list:
    """The same three in both instrumented modes; coherence of one batch from its Gram
    (``BatchCoherence``; the streaming ``Coherence`` also sums P-sized gradients)."""
    return [BatchCoherence(), Confusion(), Stiffness(num_classes=10)]


def make_trainer(mode: str, splits) -> Trainer:
    """A fresh trainer of ``mode`` (same seed, same initial weights, same batches)."""
    torch.manual_seed(0)
    model = build_model("mlp", splits.input_shape, 10, width=2048, depth=1,
                        init="xavier-sqrt2").float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    probes = Probes()
    if mode == "reused":
        probes = Probes(batch_instruments=[(inst, every(1)) for inst in instruments()])
    elif mode == "probe":
        probes = Probes([(inst, every(1, start=1)) for inst in instruments()], size=100)
    return Trainer(model, opt, splits, batch_size=100, seed=0, probes=probes,
                   recording=Recording(checkpoint=None), progress=False)


def time_mode(mode: str, splits, steps: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``steps`` steps after a 2-step warm-up."""
    trainer = make_trainer(mode, splits)
    trainer.fit(2)  # warm-up: allocator, first capture
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(2 + steps)
    return time.perf_counter() - start, time.process_time() - cpu


def time_interleaved(splits, steps: int, chunk: int) -> dict[str, float]:
    """Wall seconds of ``steps`` steps per mode, the modes taking turns every ``chunk``
    steps (one trainer each, 2-step warm-up): a shared VM's speed drifts over seconds
    (plain steps 5.2-7.5 ms within one session here), and turns of ~0.1 s put every mode
    through the same drift."""
    trainers = {mode: make_trainer(mode, splits) for mode in MODES}
    for trainer in trainers.values():
        trainer.fit(2)
    spent = dict.fromkeys(MODES, 0.0)
    for done in range(0, steps, chunk):
        for mode, trainer in trainers.items():
            start = time.perf_counter()
            trainer.fit(2 + min(done + chunk, steps))
            spent[mode] += time.perf_counter() - start
    return spent


def profile_mode(mode: str, splits, steps: int) -> dict[str, float]:
    """Cumulative seconds per ``PROFILED`` entry over ``steps`` steps of ``mode``."""
    trainer = make_trainer(mode, splits)
    trainer.fit(2)
    prof = cProfile.Profile()
    prof.runcall(trainer.fit, 2 + steps)
    stats = pstats.Stats(prof).stats  # (file, line, func) -> (cc, nc, tt, ct, callers)
    out = {"total": sum(v[2] for v in stats.values())}
    for label, frames in PROFILED.items():
        out[label] = sum(v[3] for (f, _, fn), v in stats.items()
                         if any(f.endswith(suffix) and fn == name for suffix, name in frames))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    p.add_argument("--chunk", type=int, default=0,
                   help="interleave the modes every CHUNK steps inside each repeat (e.g. 20); "
                        "0: each repeat runs the modes one after another")
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_dataset("mnist-subset")
    times: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        if args.chunk > 0:
            for mode, wall in time_interleaved(splits, args.steps, args.chunk).items():
                times[mode].append(wall)
            continue
        for mode in MODES:
            wall, used = time_mode(mode, splits, args.steps)
            times[mode].append(wall)
            cpu[mode].append(used)
    how = f"modes in turns of {args.chunk} steps" if args.chunk > 0 else "modes in sequence"
    print(f"MLP 784-2048-10, batch 100, {args.steps} steps, {args.repeats} repeats ({how}), "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    _table(times, cpu, args.steps)
    if args.profile:
        _profile_table({m: profile_mode(m, splits, args.steps) for m in ("reused", "probe")})


def _table(times: dict[str, list[float]], cpu: dict[str, list[float]], steps: int) -> None:
    """Wall time (median, min) and, when the modes ran one after another, process CPU time
    (min) per mode, with ratios to plain; then each repeat's wall-time ratio."""
    base, base_min = statistics.median(times["plain"]), min(times["plain"])
    has_cpu = all(cpu.values())  # not measured per mode when the modes take turns
    print(f"{'mode':<8} {'median s':>9} {'min s':>7} {'ms/step':>8} {'ratio':>6} "
          f"{'ratio (min)':>11}" + (f" {'CPU s':>6} {'ratio (CPU)':>11}" if has_cpu else "")
          + f"  {'ratio per repeat':>s}")
    for mode in MODES:
        med, low = statistics.median(times[mode]), min(times[mode])
        line = (f"{mode:<8} {med:9.2f} {low:7.2f} {1e3 * low / steps:8.1f} {med / base:6.2f} "
                f"{low / base_min:11.2f}")
        if has_cpu:
            used, base_cpu = min(cpu[mode]), min(cpu["plain"])
            line += f" {used:6.2f} {used / base_cpu:11.2f}"
        per = " ".join(f"{t / b:.3f}" for t, b in zip(times[mode], times["plain"]))
        print(f"{line}  {per}")


def _profile_table(profiles: dict[str, dict[str, float]]) -> None:
    print("\nprofile (cProfile cumulative seconds; nested entries overlap; the profiler "
          "itself slows Python-heavy code)")
    modes = list(profiles)
    print(f"{'':<20}" + "".join(f"{m:>10}" for m in modes))
    for label in ["total", *PROFILED]:
        print(f"{label:<20}" + "".join(f"{profiles[m][label]:10.2f}" for m in modes))


if __name__ == "__main__":
    main()
