"""Cost model: per parameter, ghost products or materialised per-example gradients?

For factors with N examples, Gb blocks, T positions, a (p, q) block, and a query over
Na x Nb example pairs (Gram / cross Gram) or the N diagonal pairs (norms):

    ghost        ~ Gb Ta Tb (p + q) * pairs                      memory: chunked, bounded
    materialise  ~ N Gb T p q (build, each side) + Gb p q * pairs
                   memory (Na + Nb) Gb p q  must fit ``MATERIALIZE_BUDGET_BYTES``

Ghost wins for dense layers on short sequences (T^2 << p q, e.g. an MLP: T = 1); materialising
wins for convolutions with many output pixels. ``strategy="ghost"|"materialize"`` overrides.

The three kinds of multiply-add do not run at the same speed (a ghost product is a bmm of
(N T, p) by (p, N T) matrices, building is N small (p, T) @ (T, q) products, the Gram of
materialised rows one large (N, P) @ (P, N) matrix product), so each count is weighted by a
time per multiply-add: :class:`Rates`, measured on this machine by :func:`calibrate`
(``graddyn calibrate``, or ``python -m graddyn.pergrad._cost``) and kept in a JSON file
(``$GRADDYN_COST_FILE``, default ``~/.cache/graddyn/cost-<device>.json``). Without one, the
three are taken as equal.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch

from ._factors import Outer

MATERIALIZE_BUDGET_BYTES = 1 << 30


@dataclass(frozen=True)
class Rates:
    """Relative time per multiply-add of each kind (the Gram product of materialised rows is
    the unit)."""

    ghost: float = 1.0
    build: float = 1.0
    product: float = 1.0


def cost_file(device: str = "cpu") -> Path:
    env = os.environ.get("GRADDYN_COST_FILE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "graddyn" / f"cost-{device}.json"


@lru_cache(maxsize=4)
def rates(device: str = "cpu") -> Rates:
    """The calibrated rates of ``device`` (equal rates if never calibrated or unreadable)."""
    try:
        data = json.loads(cost_file(device).read_text())
        return Rates(**{k: float(data[k]) for k in ("ghost", "build", "product")})
    except (OSError, ValueError, KeyError, TypeError):
        return Rates()


def _seconds(fn: object, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


CALIBRATION_SHAPES = ((32, 64, 128, 128), (32, 196, 64, 288))
"""(N, T, p, q): a transformer layer and a convolution."""


def calibrate(device: str = "cpu", dtype: torch.dtype = torch.float32, save: bool = True,
              shapes: tuple = CALIBRATION_SHAPES) -> Rates:
    """Time the three kinds of product on ``shapes`` ((N, T, p, q) each) and save the rates
    (see the module docstring). Takes a few seconds; re-run it after changing machine or
    thread count."""
    ratio = {"ghost": [], "build": []}
    for n, t, p, q in shapes:
        g = torch.randn(n * t, p, dtype=dtype, device=device)
        x = torch.randn(n * t, q, dtype=dtype, device=device)
        gb, xb = g.view(n, t, p), x.view(n, t, q)
        flat = torch.randn(n, p * q, dtype=dtype, device=device)
        ghost = _seconds(lambda g=g, x=x: ((g @ g.T) * (x @ x.T)).sum()) / (
            (n * t) ** 2 * (p + q))
        build = _seconds(lambda gb=gb, xb=xb: torch.bmm(gb.transpose(1, 2), xb)) / (n * t * p * q)
        product = _seconds(lambda flat=flat: flat @ flat.T) / (n * n * p * q)
        ratio["ghost"].append(ghost / product)
        ratio["build"].append(build / product)
    r = Rates(ghost=sum(ratio["ghost"]) / len(shapes), build=sum(ratio["build"]) / len(shapes))
    if save:
        path = cost_file(str(device))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(r), "threads": torch.get_num_threads(),
                                    "dtype": str(dtype)}, indent=1))
        rates.cache_clear()
    return r


def _pairs(a: list[Outer], b: list[Outer], diag: bool) -> int:
    na, nb = a[0].n, b[0].n
    return na if diag else na * nb


def ghost_flops(a: list[Outer], b: list[Outer], diag: bool) -> float:
    """Multiply-adds of summing ghost_cross/ghost_diag over all factor pairs."""
    pairs = _pairs(a, b, diag)
    total = 0.0
    for fa in a:
        for fb in b:
            gb, p, q = fa.layout
            left = 1 if (fa.index or fb.index) else p
            total += gb * fa.t * fb.t * (left + q) * pairs
    return total


def build_flops(side: list[Outer]) -> float:
    """Multiply-adds of materialising one side's per-example gradients."""
    return sum(f.n * f.layout[0] * f.t * (1 if f.index else f.p) * f.layout[2] for f in side)


def materialize_bytes(a: list[Outer], b: list[Outer], diag: bool) -> int:
    gb, p, q = a[0].layout
    n = a[0].n if a is b else a[0].n + b[0].n
    return n * gb * p * q * a[0].dtype.itemsize


def prefer_ghost(a: list[Outer], b: list[Outer], diag: bool,
                 built: tuple[bool, bool] = (False, False)) -> bool:
    """True when the ghost form is cheaper (calibrated rates), or materialising would not fit
    in memory. ``built``: a side already materialised (cached) costs nothing to build."""
    if materialize_bytes(a, b, diag) > MATERIALIZE_BUDGET_BYTES and not all(built):
        return True
    r = rates(a[0].left.device.type)
    gb, p, q = a[0].layout
    sides = [a] if a is b else [a, b]
    done = built[:1] if a is b else built
    build = sum(build_flops(s) for s, d in zip(sides, done) if not d)
    cost = r.build * build + r.product * gb * p * q * _pairs(a, b, diag)
    return r.ghost * ghost_flops(a, b, diag) <= cost


if __name__ == "__main__":  # python -m graddyn.pergrad._cost
    got = calibrate()
    print(f"rates (relative to the Gram product): {got}; saved to {cost_file()}")
