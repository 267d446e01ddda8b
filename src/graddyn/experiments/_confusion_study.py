"""Measurement and verdicts of the ``gradient-confusion`` experiment (Sankararaman, De, Xu,
Huang & Goldstein, "The impact of neural network overparameterization on gradient confusion
and stochastic gradient descent", ICML 2020).

Two forms of gradient confusion, both over training:

* **per-example**: the engine's (B, B) Gram of per-example gradients on a fixed probe batch
  (``graddyn.capture``). Batch norm in training mode couples the examples, so per-example
  gradients are only defined with eval-mode statistics: :func:`eval_mode_backward` runs the
  capture with ``model.eval()`` (running statistics) and restores the mode afterwards.
  Caveat: at init the running statistics are (0, 1), so batch norm is then near identity and
  this form measures a different function from the one SGD trains; use the minibatch form
  for claims about batch norm.
* **minibatch** (the paper's form): ``count`` minibatch gradients of ``size`` examples, each
  from its own ordinary backward pass in the model's current mode (batch norm in *training*
  mode, as SGD sees it), compared over all ``count (count - 1) / 2`` pairs. The paper draws
  100 pairs of size-128 minibatches at the end of each epoch; all pairs of ``count`` draws
  give as many pairs for ~sqrt(2 * 100) backward passes. Running statistics of batch norm
  are restored afterwards, so measuring never changes training.

Statistics (``graddyn.instruments.confusion``): ``min_cosine``, ``eta = max(0, -min inner)``,
cosine quantiles and histogram. Verdicts (rules of ``_stats``): a trend across a factor is the
per-seed least-squares slope against log2(factor), with its 95 % t-interval over seeds; two
groups are compared by Welch's interval of their difference; "does not grow" is an absence
claim that holds only when the slope's interval lies inside +-``ABSENCE_SLOPE``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from graddyn.experiments._stats import (
    Estimate,
    absence_verdict,
    effect_verdict,
    mean_ci,
    slopes,
    welch_diff,
)
from graddyn.instruments._base import Instrument, Probe
from graddyn.instruments.confusion import (
    Confusion,
    confusion_from_vectors,
    minibatch_gradient,
)
from graddyn.train import LossFn, Run, capture_backward, per_example_cross_entropy

__all__ = [
    "MinibatchConfusion",
    "compare_groups",
    "eval_mode_backward",
    "mean_ci_text",
    "minibatch_confusion",
    "per_example_confusion",
    "spearman",
    "steps_to_target",
    "trend",
    "trend_verdict",
]



# ---- measurement ------------------------------------------------------------------------
def eval_mode_backward(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> tuple:
    """``graddyn.train.capture_backward`` in eval mode (batch norm uses its running
    statistics, so per-example gradients exist); the previous mode is restored.

    Returns ``(BatchGrads, losses (B,), outputs (B, K))``. A no-op change for nets without
    batch norm or dropout."""
    was_training = model.training
    model.eval()
    try:
        return capture_backward(model, loss_fn, x, y)
    finally:
        model.train(was_training)


def per_example_confusion(model: nn.Module, x: Tensor, y: Tensor,
                          loss_fn: LossFn = per_example_cross_entropy) -> dict[str, Any]:
    """Confusion of the per-example gradients of ``(x (B, ...), y (B,))``, B >= 2: one engine
    pass in eval mode, then the ``Confusion`` instrument (B(B-1)/2 pairs of the Gram).

    Cost: one forward and one backward of the batch plus the (B, B) Gram."""
    grads, losses, outputs = eval_mode_backward(model, loss_fn, x, y)
    inst = Confusion()
    inst.update(Probe(grads=grads, losses=losses, outputs=outputs, targets=y, model=model))
    return inst.compute()


def _bn_buffers(model: nn.Module) -> list[tuple[Tensor, Tensor]]:
    """(buffer, saved copy) of every batch-norm buffer (running mean / var, batch count)."""
    return [(b, b.detach().clone()) for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def draw_minibatches(n: int, count: int, size: int, generator: torch.Generator) -> list[Tensor]:
    """``count`` index tensors (size,) of distinct examples; disjoint while ``count * size <=
    n`` (one permutation), otherwise each drawn independently."""
    if size > n:
        raise ValueError(f"minibatch size {size} exceeds the {n} training examples; lower "
                         "mb_size")
    if count * size <= n:
        return list(torch.randperm(n, generator=generator)[: count * size].split(size))
    return [torch.randperm(n, generator=generator)[:size] for _ in range(count)]


def minibatch_confusion(model: nn.Module, x: Tensor, y: Tensor, count: int, size: int,
                        generator: torch.Generator,
                        loss_fn: LossFn = per_example_cross_entropy) -> dict[str, Any]:
    """Confusion over all pairs of ``count`` minibatch gradients of ``size`` examples of
    ``(x (N, ...), y (N,))``, each a separate mean-loss backward in the model's current mode.

    Batch-norm running statistics are restored afterwards. Cost: ``count`` forward/backward
    passes of ``size`` examples and ``count`` gradient copies (count x P memory)."""
    if count < 2:
        raise ValueError(f"need at least 2 minibatch gradients to form a pair, got count={count}")
    saved = _bn_buffers(model)
    try:
        grads = [minibatch_gradient(model, loss_fn, x[idx], y[idx])
                 for idx in draw_minibatches(len(y), count, size, generator)]
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)
    return confusion_from_vectors(grads)


class MinibatchConfusion(Instrument):
    """The paper's minibatch form as an instrument on the trainer's schedule: at each probe it
    measures :func:`minibatch_confusion` on the training set ``(x, y)``. The minibatches are
    drawn from a generator seeded by ``(seed, step)``, so a resumed run draws the same ones and
    training's own random stream is untouched. Keys as ``Confusion``'s.
    """

    name: ClassVar[str] = "mb_confusion"
    needs_grads: ClassVar[bool] = False

    def __init__(self, x: Tensor, y: Tensor, count: int = 10, size: int = 128, seed: int = 0,
                 loss_fn: LossFn = per_example_cross_entropy) -> None:
        self.x, self.y, self.count, self.size = x, y, count, size
        self.seed, self.loss_fn = seed, loss_fn
        self.reset()

    def reset(self) -> None:
        self._model: nn.Module | None = None
        self._step = 0

    def update(self, probe: Probe) -> None:
        if probe.model is None:
            raise ValueError("MinibatchConfusion needs probe.model (the trainer sets it); pass "
                             "Probe(model=model, step=step)")
        self._model, self._step = probe.model, probe.step

    def compute(self) -> dict[str, Any]:
        if self._model is None:
            raise ValueError("MinibatchConfusion.compute() before update(); call update(probe) "
                             "first")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self._step)
        return minibatch_confusion(self._model, self.x, self.y, self.count, self.size, gen,
                                   self.loss_fn)


# ---- summaries of a run ------------------------------------------------------------------
def steps_to_target(steps: np.ndarray, values: np.ndarray, target: float,
                    higher_is_better: bool) -> float:
    """First step at which ``values`` reach ``target`` (``>=`` or ``<=``); inf if never.

    >>> steps_to_target(np.array([0, 10, 20]), np.array([0.1, 0.8, 0.9]), 0.8, True)
    10.0
    """
    hit = values >= target if higher_is_better else values <= target
    return float(steps[np.argmax(hit)]) if hit.any() else float("inf")


def cell_summary(run: Run, tag: str, target_acc: float, target_loss: float) -> dict[str, float]:
    """Numbers of one trained cell (metrics prefixed ``tag/``): for each form ``pe``
    (per-example) and ``mb`` (minibatch), min cosine and eta at init, averaged over the
    measurements, at the end, and ``matched``: at the first measurement whose train loss is
    <= ``target_loss`` (nan if none; compares nets at the same stage of training, since
    confusion grows as the loss falls); steps to the targets; final train loss, test acc.
    A diverged cell (training loss not finite) keeps only its init values (others nan)."""
    out: dict[str, float] = {}
    loss_steps, loss = run.history(f"{tag}/train/loss")
    done = {int(s) for s, v in zip(loss_steps, loss) if v <= target_loss}
    diverged = len(run.history(f"{tag}/diverged")[1]) > 0
    for form, inst in (("pe", "confusion"), ("mb", "mb_confusion")):
        for key in ("min_cosine", "eta", "mean_cosine"):
            steps, vals = run.history(f"{tag}/{inst}/{key}")
            if len(vals) == 0:
                raise ValueError(f"run {run.name!r} has no {tag}/{inst}/{key}; run the study "
                                 "first (graddyn run gradient-confusion)")
            matched = [v for s, v in zip(steps, vals) if int(s) in done]
            out |= {f"{form}_{key}_init": vals[0], f"{form}_{key}_avg": float(np.mean(vals)),
                    f"{form}_{key}_end": vals[-1],
                    f"{form}_{key}_matched": matched[0] if matched else float("nan")}
            if diverged:  # only the values before divergence exist: no training to average
                out |= {f"{form}_{key}_{w}": float("nan") for w in ("avg", "end", "matched")}
    acc_steps, acc = run.history(f"{tag}/train/acc")
    out["steps_to_acc"] = steps_to_target(acc_steps, acc, target_acc, True)
    out["steps_to_loss"] = steps_to_target(loss_steps, loss, target_loss, False)
    out["final_train_loss"] = float(loss[-1]) if len(loss) and not diverged else float("inf")
    _, test = run.history(f"{tag}/test/acc")
    out["final_test_acc"] = float(test[-1]) if len(test) else float("nan")
    out["diverged"] = float(diverged)
    return out


# ---- verdicts ----------------------------------------------------------------------------
# Parameters of the verdicts (stated in the claims file).
ABSENCE_SLOPE = 0.02  # "does not grow with depth": |min-cosine change per doubling| below this


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties; inf ranks last); nan if either
    side is constant or fewer than 2 pairs are free of nan (nan pairs are dropped). A
    description of the pooled cells only: verdicts use per-seed slopes and intervals.

    >>> spearman([1, 2, 3], [10, 20, float("inf")])
    1.0
    """
    from scipy.stats import spearmanr

    x_, y_ = np.asarray(x, float), np.asarray(y, float)
    keep = ~(np.isnan(x_) | np.isnan(y_))  # cells without a value (e.g. loss never reached)
    x_, y_ = x_[keep], y_[keep]
    if len(np.unique(x_)) < 2 or len(np.unique(y_)) < 2:  # a constant side: no ranking
        return float("nan")
    return float(spearmanr(x_, y_).statistic)


def trend(factors: Sequence[float], per_seed: np.ndarray) -> Estimate:
    """Mean and 95 % interval over seeds of the per-seed least-squares slope of a statistic
    against log2(factor): its change per doubling of width or depth (log2(1 + factor) when a
    factor is 0, e.g. depth 0). ``per_seed`` is (S, F), one row per seed in factor order; a
    NaN cell makes that seed's slope NaN (no interval: inconclusive), so a missing value is
    never support."""
    f = np.asarray(factors, float)
    return mean_ci(slopes(np.log2(f if f.min() > 0 else f + 1), per_seed))


def trend_verdict(est: Estimate, expected_sign: int) -> str:
    """The effect rule of ``_stats`` on a per-doubling slope: ``holds`` when its interval
    excludes 0 with the expected sign, ``fails`` when it lies wholly on the other side."""
    if expected_sign not in (-1, 1):
        raise ValueError(f"expected_sign must be +1 or -1, got {expected_sign}")
    return effect_verdict(est, expected_sign)


def compare_groups(a: Sequence[float], b: Sequence[float]) -> tuple[Estimate, str]:
    """Is mean(a) > mean(b)? Welch's 95 % interval of the difference over seeds (different
    architectures: unpaired) and the effect rule: ``holds`` if it excludes 0 above,
    ``fails`` if below, else ``inconclusive``. A NaN value (no value) gives inconclusive."""
    if len(a) == 0 or len(b) == 0:
        raise ValueError("compare_groups needs at least one value on each side")
    est = welch_diff(a, b)
    return est, effect_verdict(est, +1)


def mean_ci_text(values: Sequence[float]) -> str:
    """``"m ± h"`` (mean, half-width of the 95 % t-interval over seeds; 3 significant digits);
    ``inf`` when a value is inf (never reached); ``n/a`` when a value is missing (NaN)."""
    v = np.asarray(values, float)
    if len(v) == 0 or np.isnan(v).any():
        return "n/a" if len(v) == 0 or np.isnan(v).all() else \
            f"n/a ({int(np.isnan(v).sum())}/{len(v)} seeds without a value)"
    if np.isinf(v).any():
        return "inf (not reached)" if np.isinf(v).all() else f"{np.mean(v[np.isfinite(v)]):.3g}+"
    est = mean_ci(v)
    return f"{est.mean:.3g} ± {est.half_width:.2g}" if est.defined else f"{est.mean:.3g} (n=1)"



# ---- the paper's claims -------------------------------------------------------------------
# group -> factor value (width or depth) -> one cell summary per seed
Table = dict[str, dict[int, list[dict[str, float]]]]
Claim = tuple[str, str, str, str]  # (claim, form, measured, verdict)
# (key pattern, label): each confusion claim is checked for both forms at init (where the
# paper's theory applies), averaged over training (its experiments' curves), and at matched
# train loss (the average mixes in training progress, since confusion grows as loss falls)
LOSS_CAP = 1e3  # a diverged cell's final loss (inf) ranks last
FORMS = tuple((f"{f}_{{}}_{w}", f"{label}, {when}")
              for f, label in (("pe", "per-example"), ("mb", "minibatch"))
              for w, when in (("init", "at init"), ("avg", "avg over training"),
                              ("matched", "at matched train loss")))


def _vals(table: Table, group: str, factor: int, key: str, cap: float) -> list[float]:
    """One value per seed; inf (target never reached) becomes ``cap`` so ranks stay right."""
    return [min(s[key], cap) for s in table[group][factor]]


def _grid(table: Table, group: str, key: str, cap: float) -> tuple[list[int], np.ndarray]:
    """(factors (F,), values (S, F)): each seed's value at every factor of ``group``."""
    factors = sorted(table[group])
    n = min(len(table[group][f]) for f in factors)
    return factors, np.array([_vals(table, group, f, key, cap)[:n] for f in factors]).T


def _ends(table: Table, group: str, key: str, name: str) -> str:
    """``"name 8: m ± h -> 512: m ± h"`` at the smallest and largest factor (95 % intervals)."""
    lo, hi = min(table[group]), max(table[group])
    raw = {f: [s[key] for s in table[group][f]] for f in (lo, hi)}
    return f"{name} {lo}: {mean_ci_text(raw[lo])} -> {hi}: {mean_ci_text(raw[hi])}"


def _trend_row(table: Table, group: str, key: str, sign: int, claim: str, form: str,
               name: str, cap: float) -> Claim:
    est = trend(*_grid(table, group, key, cap))
    rho = spearman(*_pairs(table, group, key, cap))
    measured = (f"{_ends(table, group, key, name)}; change per doubling {est} "
                f"(pooled Spearman rho {rho:.2f}){_diverged(table, group)}")
    return claim, form, measured, trend_verdict(est, sign)


def _pairs(table: Table, group: str, key: str, cap: float) -> tuple[list[float], list[float]]:
    """(factor, value) over every (factor, seed) cell of ``group``."""
    xs, ys = [], []
    for f in sorted(table[group]):
        vals = _vals(table, group, f, key, cap)
        xs += [float(f)] * len(vals)
        ys += vals
    return xs, ys


def _diverged(table: Table, group: str) -> str:
    """``"; k/n cells diverged"`` or ``""``."""
    cells = [s for by_seed in table[group].values() for s in by_seed]
    k = sum(s["diverged"] > 0 for s in cells)
    return f"; {k}/{len(cells)} cells diverged (no value after init)" if k else ""


def _deltas(table: Table, group: str, key: str) -> list[float]:
    """Per seed: value at the largest factor minus value at the smallest."""
    lo, hi = min(table[group]), max(table[group])
    return [b[key] - a[key] for a, b in zip(table[group][lo], table[group][hi])]


def _scaling_claims(study: str, table: Table, cap: float) -> list[Claim]:
    """width: wider -> less confusion, faster; depth: deeper -> more confusion, slower."""
    group, name = next(iter(table)), study
    sign = 1 if study == "width" else -1  # sign of the min-cosine trend the paper predicts
    more, less = ("Wider", "lower") if study == "width" else ("Deeper", "higher")
    rows = [_trend_row(table, group, f.format("min_cosine"), sign,
                       f"{more} networks have {less} gradient confusion (min cosine)", label,
                       name, cap) for f, label in FORMS]
    rows += [_trend_row(table, group, f.format("eta"), -sign,
                        f"{more} networks have {less} eta = max(0, -min inner product)", label,
                        name, cap) for f, label in FORMS]
    speed = "faster" if study == "width" else "slower"
    rows.append(_trend_row(table, group, "steps_to_acc", -sign,
                           f"{more} networks train {speed} (steps to target accuracy)", "-",
                           name, cap))
    rows.append(_trend_row(table, group, "final_train_loss", -sign,
                           f"{more} networks train {speed} (train loss after the budget)", "-",
                           name, LOSS_CAP))
    return rows


def _bn_skip_claims(table: Table, cap: float) -> list[Claim]:
    deep = max(table["plain"])
    rows: list[Claim] = []
    for f, label in FORMS:
        key = f.format("min_cosine")
        a, b = _vals(table, "bn+skip", deep, key, cap), _vals(table, "plain", deep, key, cap)
        est, verdict = compare_groups(a, b)
        rows.append((f"BN + skip reduce gradient confusion at depth {deep}", label,
                     f"min cosine bn+skip {mean_ci_text(a)} vs plain {mean_ci_text(b)} "
                     f"(difference {est})", verdict))
        da, db = _deltas(table, "bn+skip", key), _deltas(table, "plain", key)
        est, verdict = compare_groups(da, db)
        rows.append(("With BN + skip confusion grows less with depth than without", label,
                     f"change of min cosine from shallowest to deepest: bn+skip "
                     f"{mean_ci_text(da)}, plain {mean_ci_text(db)} (difference {est})",
                     verdict))
    a, b = _vals(table, "plain", deep, "steps_to_acc", cap), \
        _vals(table, "bn+skip", deep, "steps_to_acc", cap)
    est, verdict = compare_groups(a, b)
    rows.append((f"BN + skip train faster at depth {deep}", "-",
                 f"steps to target: plain {mean_ci_text(a)} vs bn+skip {mean_ci_text(b)} "
                 f"(capped at {cap:g})", verdict))
    a, b = (_vals(table, g, deep, "final_train_loss", LOSS_CAP) for g in ("plain", "bn+skip"))
    rows.append((f"BN + skip train faster at depth {deep}", "-", f"train loss after the "
                 f"budget: plain {mean_ci_text(a)} vs bn+skip {mean_ci_text(b)}",
                 compare_groups(a, b)[1]))
    return rows


def _init_claims(table: Table, cap: float) -> list[Claim]:
    rows: list[Claim] = []
    for f, label in FORMS:
        key = f.format("min_cosine")
        if "gaussian" in table:
            rows.append(_trend_row(table, "gaussian", key, -1, "Gaussian init: confusion of "
                                   "deep linear nets grows with depth", label, "depth", cap))
        if "orthogonal" in table:
            est = trend(*_grid(table, "orthogonal", key, cap))
            rows.append(("Orthogonal init: confusion of deep linear nets does not grow with "
                         "depth", label, f"{_ends(table, 'orthogonal', key, 'depth')}; change "
                         f"per doubling {est} (absence: within ±{ABSENCE_SLOPE})"
                         f"{_diverged(table, 'orthogonal')}",
                         absence_verdict(est, ABSENCE_SLOPE)))
        if {"gaussian", "orthogonal"} <= set(table):
            deep = max(table["orthogonal"])
            a, b = _vals(table, "orthogonal", deep, key, cap), \
                _vals(table, "gaussian", deep, key, cap)
            est, verdict = compare_groups(a, b)
            rows.append((f"Orthogonal init has less confusion than Gaussian at depth {deep}",
                         label, f"min cosine orthogonal {mean_ci_text(a)} vs gaussian "
                         f"{mean_ci_text(b)} (difference {est})", verdict))
    return rows


def paper_claims(study: str, table: Table, total_steps: int) -> list[Claim]:
    """The paper's claims that ``study`` tests, each with its numbers and a verdict.

    Confusion is the minimum pairwise cosine (and eta) at init and averaged over the
    measurements of training (init included); a target never reached counts as
    ``2 * total_steps`` steps."""
    cap = 2.0 * total_steps
    if study in ("width", "depth"):
        return _scaling_claims(study, table, cap)
    if study == "bn-skip":
        return _bn_skip_claims(table, cap)
    if study == "init":
        return _init_claims(table, cap)
    raise ValueError(f"unknown study {study!r}; valid: width, depth, bn-skip, init")
