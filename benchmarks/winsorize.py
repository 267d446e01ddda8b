"""One winsorized-SGD training step against a plain SGD step and a torch.func-materialise-then-
``torch.quantile`` implementation, on the 784-256-256-256-10 MLP (batch 100) and a small CNN
(batch 64), each (model, method) in a fresh subprocess so peak memory is its own.

    python benchmarks/winsorize.py --c 1 2 4 8                    # 5 repeats, 1 thread
    python benchmarks/winsorize.py --c 1 --repeats 2 --skip-quantile --skip-eager  # smoke run

Target (issue 4): graddyn's winsorized step <= 10x the plain step on the MLP. "graddyn" uses
``winsorized_mean(graddyn.capture(...).backward(losses), c)`` through
``graddyn.interventions.winsorize.WinsorizedGradient`` with the compiled kernel
(``graddyn._kernels.winsorize``); "graddyn-eager" is the same with the kernel switched off
(``GRADDYN_NO_KERNEL=1``: the sorting PyTorch reference, ``graddyn._robust``). If the engine
cannot be imported it falls back to torch.func per-example gradients + the same kernel (and
says so).
Times are the best of ``--repeats`` steps after a warm-up step: wall (``perf_counter``) and CPU
(``process_time``; steadier on a shared machine). The kernel's first call (compiling, or
loading numba's on-disk cache) happens before the warm-up and is reported on its own: once
with an empty cache (``NUMBA_CACHE_DIR`` = a fresh folder: the cold compile) and as "load s"
per row (the cache the first child filled). Peak memory: CPU = peak RSS above the RSS after
that first call (numba and LLVM themselves take ~150 MB once loaded); CUDA = max allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

METHODS = ("plain", "graddyn", "graddyn-eager", "func-quantile")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(),
                         nn.Linear(128, 10))


MODELS = {"mlp": (mlp, 100), "cnn": (cnn, 64)}


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def quantile_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, c: int) -> None:
    """The straightforward way: materialise (B, P) by torch.func; torch.quantile per coordinate."""
    from torch.func import functional_call, grad, vmap

    params = {k: p.detach() for k, p in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None]).sum()

    per = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    b = x.shape[0]
    q = torch.tensor([c / (b - 1), (b - 1 - c) / (b - 1)], dtype=x.dtype, device=x.device)
    for name, p in model.named_parameters():
        g = per[name].reshape(b, -1)
        width = max(1, (1 << 24) // b)  # torch.quantile refuses inputs over 2**24 elements
        cols = []
        for a in range(0, g.shape[1], width):
            blk = g[:, a:a + width]
            lo, hi = torch.quantile(blk, q, dim=0, interpolation="nearest")
            cols.append(blk.clamp(lo, hi).mean(0))
        p.grad = torch.cat(cols).reshape(p.shape)


def load_kernel(dtype: torch.dtype) -> float:
    """Seconds of the kernel's first call (compile, or load numba's cache); -1 if unavailable."""
    from graddyn._kernels import winsorize as kernel

    t0 = time.perf_counter()
    if not kernel.usable(torch.zeros(3, 1, dtype=dtype)):  # compiles or loads the cache
        return -1.0
    return time.perf_counter() - t0


def make_step(method: str, model: nn.Module, c: int):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    note = ""
    if method.startswith("graddyn"):
        from graddyn.interventions.winsorize import WinsorizedGradient, _engine

        grads_from = "capture" if _engine() is not None else "func"
        note = "" if grads_from == "capture" else "engine unavailable: torch.func fallback"
        rule = WinsorizedGradient(c, grads_from=grads_from)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        if method == "plain":
            loss_fn(model(x), y).mean().backward()
        elif method.startswith("graddyn"):
            rule.compute(model, x, y, loss_fn)
        else:
            quantile_step(model, x, y, c)
        opt.step()

    return step, note


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(model_name: str, method: str, c: int, repeats: int, device: str) -> dict:
    torch.manual_seed(0)
    build, b = MODELS[model_name]
    model = build().to(device)
    x = torch.randn(b, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (b,), device=device)
    step, note = make_step(method, model, c)
    load_s = load_kernel(x.dtype) if method.startswith("graddyn") else 0.0
    if load_s < 0 and method == "graddyn":
        note = (note + "; " if note else "") + "kernel unavailable: eager path"
    base = rss_bytes()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step(x, y)  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step(x, y)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"ms": 1000 * min(times), "cpu_ms": 1000 * min(cpu), "peak_mb": max(peak, 0) / 2**20,
            "load_s": max(load_s, 0.0), "note": note}


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(args.model, args.method, args.c[0], args.repeats, args.device)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--c", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--skip-quantile", action="store_true", help="skip the slow baseline")
    ap.add_argument("--skip-eager", action="store_true", help="skip the kernel-off rows")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.method:
        return child(args)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"torch {torch.__version__}, threads {args.threads}, device {args.device}, "
          f"best of {args.repeats}, load average {load}")
    with tempfile.TemporaryDirectory() as cold:  # an empty numba cache: the real compile
        first = run_child(args, args.models[0], "graddyn", args.c[0], {"NUMBA_CACHE_DIR": cold})
    print(f"kernel first call with an empty cache (compile, float32): {first['load_s']:.1f} s")
    print("| model | c | method | wall ms | x plain | CPU ms | x plain (CPU) | peak MB | load s |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    skip = {"func-quantile": args.skip_quantile, "graddyn-eager": args.skip_eager}
    for model_name in args.models:
        plain = run_child(args, model_name, "plain", 0)
        print(f"| {model_name} | - | plain | {plain['ms']:.1f} | 1.0 | {plain['cpu_ms']:.1f} | "
              f"1.0 | {plain['peak_mb']:.1f} | |")
        for c in args.c:
            for method in METHODS[1:]:
                if skip.get(method):
                    continue
                r = run_child(args, model_name, method, c)
                load_s = f"{r['load_s']:.2f}" if method == "graddyn" else ""
                print(f"| {model_name} | {c} | {method} | {r['ms']:.1f} | "
                      f"{r['ms'] / plain['ms']:.1f} | {r['cpu_ms']:.1f} | "
                      f"{r['cpu_ms'] / plain['cpu_ms']:.1f} | {r['peak_mb']:.1f} | {load_s} | "
                      f"{r['note']}")
    with open("/proc/loadavg") as f:
        print(f"load average at the end {' '.join(f.read().split()[:3])}")


def run_child(args: argparse.Namespace, model_name: str, method: str, c: int,
              env: dict[str, str] | None = None) -> dict:
    cmd = [sys.executable, __file__, "--model", model_name, "--method", method, "--c", str(c),
           "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--device", args.device]
    env = {**os.environ, **(env or {})}
    env.pop("OMP_NUM_THREADS", None)  # --threads decides (torch.set_num_threads in the child)
    if method == "graddyn-eager":
        env["GRADDYN_NO_KERNEL"] = "1"
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
