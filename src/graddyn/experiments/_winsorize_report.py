"""Report of ``coherent-gradients.winsorize``: the paper's grid (Chatterjee, ICLR 2020,
Section 3, Fig. 4: training accuracy, test accuracy and overfit over steps, one panel per
(noise, c), mean over seeds), a summary table with 95 % intervals over seeds, and verdicts on
the paper's three predictions computed from the recorded histories with the rules of
``_stats`` (never hard-coded outcomes).

Histories are ``{(noise, c): {seed: {name: (steps (T,), values (T,))}}}`` with names
``train_acc``, ``test_acc`` and optionally ``corrupt_fit``; ``verdicts`` and ``summary_rows``
are pure functions of them, so they are tested on synthetic histories.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from graddyn.experiments._stats import (
    Estimate,
    all_of,
    effect_verdict,
    mean_ci,
    slopes,
)
from graddyn.experiments._verdicts import (  # noqa: F401  (re-exported)
    Verdict,
    departures,
    end_value,
    mean_over_steps,
    not_tested,
    robust_peak,
    verdict_markdown,
    write_verdicts,
)
from graddyn.train import Run, new_figure, save_figure

Curve = tuple[np.ndarray, np.ndarray]  # (steps (T,), values (T,))
Point = tuple[float, int]  # (noise fraction eps, c)
Seeds = Mapping[int, Mapping[str, Curve]]  # seed -> name -> curve
Histories = Mapping[Point, Seeds]
MeanHistories = Mapping[Point, Mapping[str, Curve]]  # seed-mean curves, for the figures

# Parameters of the verdicts (written into the verdict file).
PROPER_TOL = 0.02  # (1) peak training accuracy may exceed the proper accuracy by this much
PEAK_DROP = 0.02  # (3) the end of training accuracy at least this far below its peak
WINDOW = 3  # peak: largest running median of 3 evaluations; end: median of the last 3
PARAMS = {"proper-accuracy tolerance": PROPER_TOL, "peak drop": PEAK_DROP,
          "peak": f"largest running median of {WINDOW} evaluations",
          "end": f"median of the last {WINDOW} evaluations",
          "mean overfit": "step-weighted mean of the overfit curve over training"}


def proper_accuracy(noise: float, num_classes: int = 10) -> float:
    """Training accuracy of a model that fits exactly the pristine examples and is at chance
    on the corrupt ones: 1 - eps + eps / K (the paper's 1 - eps + 0.1 eps on MNIST)."""
    return 1.0 - noise + noise / num_classes


def overfit_measure(train_acc: Any, test_acc: Any, noise: float, num_classes: int = 10
                    ) -> np.ndarray:
    """The paper's overfit: train_acc - [eps / K + (1 - eps) test_acc], elementwise.

    A model that generalises to a corrupt training example as it does to a test example gets
    it right with chance 1/K (its label is random), a pristine one with the test accuracy;
    the excess over that is memorisation. (Chatterjee writes eps * 0.1 for K = 10.)

    >>> float(overfit_measure(1.0, 0.9, 0.5))
    0.5
    """
    train, test = np.asarray(train_acc, float), np.asarray(test_acc, float)
    return train - (noise / num_classes + (1.0 - noise) * test)


def overfit_curve(h: Mapping[str, Curve], noise: float, num_classes: int = 10) -> Curve:
    """Overfit of one seed's histories ``h`` over the steps where both accuracies were
    evaluated."""
    (s_tr, tr), (s_te, te) = h["train_acc"], h["test_acc"]
    steps, i, j = np.intersect1d(s_tr, s_te, return_indices=True)
    return steps, overfit_measure(np.asarray(tr)[i], np.asarray(te)[j], noise, num_classes)


def _label(point: Point) -> str:
    return f"{round(100 * point[0])} %/c={point[1]}"


def per_seed(seeds: Seeds, fn: Callable[[Mapping[str, Curve]], float]) -> np.ndarray:
    """``fn`` of each seed's histories -> (S,)."""
    return np.array([fn(h) for h in seeds.values()], float)


def _mean_overfit(noise: float, k: int) -> Callable[[Mapping[str, Curve]], float]:
    return lambda h: mean_over_steps(overfit_curve(h, noise, k))


def _shared_seeds(hist: Histories, points: Sequence[Point]) -> list[int]:
    """Seeds present at every point (the pairing of a comparison)."""
    common = set.intersection(*(set(hist[p]) for p in points))
    return sorted(common)


# ---- verdicts ---------------------------------------------------------------------------
def verdicts(hist: Histories, num_classes: int = 10) -> list[Verdict]:
    """The paper's three predictions checked on ``hist`` (rules: ``_stats``)."""
    return [_below_proper(hist, num_classes), _overfit_slower(hist, num_classes),
            _peak_then_fall(hist)]


def _above_proper(seeds: Seeds, noise: float, k: int) -> Estimate:
    """Per seed: robust peak training accuracy - (proper accuracy + tolerance)."""
    peak = per_seed(seeds, lambda h: robust_peak(h["train_acc"], WINDOW))
    return mean_ci(peak - proper_accuracy(noise, k) - PROPER_TOL)


def _below_proper(hist: Histories, k: int) -> Verdict:
    name = "(1) for c > 0 training accuracy does not exceed the proper accuracy 1 - eps + eps/K"
    tested = sorted(p for p in hist if p[1] > 0 and p[0] > 0)
    if not tested:
        return not_tested(name, "needs a point with c > 0 and noise > 0")
    words, parts = [], []
    for p in tested:
        est = _above_proper(hist[p], p[0], k)
        words.append(effect_verdict(est, -1))
        parts.append(f"{_label(p)}: peak - proper - tol {est}")
    plain = [p for p in sorted(hist) if p[1] == 0 and p[0] > 0]
    controls = {p: _above_proper(hist[p], p[0], k) for p in plain}
    evidence = "; ".join(parts) + "".join(
        f"; plain SGD {_label(p)}: {e}" for p, e in controls.items())
    word = all_of(words)
    if not plain or not all(effect_verdict(e, +1) == "holds" for e in controls.values()):
        word = "inconclusive"  # the c = 0 control did not clearly memorise: too short to tell
        evidence += "; the c = 0 control does not clearly exceed it (too short to tell)"
    return Verdict(name, word, evidence,
                   f"robust peak < proper + {PROPER_TOL} at every c > 0, noise > 0 point, while "
                   "the c = 0 control at that noise exceeds it")


def _overfit_slower(hist: Histories, k: int) -> Verdict:
    name = "(2) overfit grows more slowly as c grows"
    words, parts = [], []
    for eps in sorted({p[0] for p in hist if p[0] > 0}):
        cs = sorted(p[1] for p in hist if p[0] == eps)
        if len(cs) < 2:
            continue
        seeds = _shared_seeds(hist, [(eps, c) for c in cs])
        table = np.array([[_mean_overfit(eps, k)(hist[(eps, c)][s]) for c in cs]
                          for s in seeds]).reshape(len(seeds), len(cs))  # (S, C)
        est = mean_ci(slopes(cs, table)) if seeds else mean_ci([])
        words.append(effect_verdict(est, -1))
        means = ", ".join(f"c={c} {mean_ci(table[:, i])}" for i, c in enumerate(cs))
        parts.append(f"{round(100 * eps)} %: mean overfit {means}; slope per unit c {est}")
    if not words:
        return not_tested(name, "needs two c values at one noise level > 0")
    return Verdict(name, all_of(words), "; ".join(parts),
                   "per-seed least-squares slope of mean overfit against c < 0 at every noise "
                   "level > 0 (a flat overfit, no effect of c, does not hold)")


def _peak_then_fall(hist: Histories) -> Verdict:
    """Training accuracy, not test: plain SGD's test accuracy also peaks and falls under
    label noise (memorisation), while its training accuracy never falls; a falling training
    accuracy is the signature of winsorization starving the update."""
    name = "(3) strong winsorization (largest c) makes training accuracy peak and then fall"
    c_max = max((p[1] for p in hist), default=0)
    if c_max == 0:
        return not_tested(name, "needs a c > 0 point")
    words, parts = [], []
    for p in sorted(p for p in hist if p[1] == c_max):
        drop = per_seed(hist[p], lambda h: robust_peak(h["train_acc"], WINDOW)
                        - end_value(h["train_acc"], WINDOW))
        test = per_seed(hist[p], lambda h: robust_peak(h["test_acc"], WINDOW)
                        - end_value(h["test_acc"], WINDOW))
        est = mean_ci(drop - PEAK_DROP)
        words.append(effect_verdict(est, +1))
        parts.append(f"{_label(p)}: train drop {mean_ci(drop)} (test drop {mean_ci(test)})")
    return Verdict(name, all_of(words), "robust peak - end, " + "; ".join(parts),
                   f"training accuracy robust peak - end > {PEAK_DROP} at c = {c_max}, every "
                   "noise level (one-evaluation collapses and spikes do not count)")


# ---- summary table ----------------------------------------------------------------------
SUMMARY_COLUMNS = ("noise", "c", "proper_acc", "train_acc", "peak_train_acc", "test_acc",
                   "peak_test_acc", "overfit", "mean_overfit", "corrupt_fit", "seeds")


def summary_rows(hist: Histories, num_classes: int = 10) -> list[dict[str, Any]]:
    """One row per (noise, c): end and robust-peak accuracies, end and mean overfit, the end
    fraction of corrupt examples fit to their wrong label (memorisation), each an
    ``Estimate`` over seeds; and the number of seeds."""
    rows = []
    for p in sorted(hist):
        seeds, over = hist[p], _mean_overfit(p[0], num_classes)

        def est(fn: Callable[[Mapping[str, Curve]], float], seeds: Seeds = seeds) -> Estimate:
            return mean_ci(per_seed(seeds, fn))

        rows.append({
            "noise": p[0], "c": p[1], "proper_acc": proper_accuracy(p[0], num_classes),
            "train_acc": est(lambda h: end_value(h["train_acc"], WINDOW)),
            "peak_train_acc": est(lambda h: robust_peak(h["train_acc"], WINDOW)),
            "test_acc": est(lambda h: end_value(h["test_acc"], WINDOW)),
            "peak_test_acc": est(lambda h: robust_peak(h["test_acc"], WINDOW)),
            "overfit": est(lambda h, e=p[0]: end_value(overfit_curve(h, e, num_classes),
                                                       WINDOW)),
            "mean_overfit": est(over),
            "corrupt_fit": est(lambda h: end_value(h.get("corrupt_fit"), WINDOW)),
            "seeds": len(seeds),
        })
    return rows


def _cell(v: Any) -> str:
    if isinstance(v, Estimate):
        return str(v)
    return str(v) if isinstance(v, int) else f"{v:.3f}"


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in SUMMARY_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---- collecting runs --------------------------------------------------------------------
def collect(runs: Sequence[Run]) -> tuple[dict[Point, dict[int, dict[str, Curve]]], int]:
    """Histories of every run keyed by (noise, c) then seed, and the number of classes. Seeds
    with no evaluation yet are left out; two runs at the same (noise, c) are an error."""
    hist: dict[Point, dict[int, dict[str, Curve]]] = {}
    owner: dict[Point, str] = {}
    classes = 10
    for run in runs:
        names = set(run.metric_names())
        point = (float(run.config["noise"]), int(run.config["c"]))
        seeds = [int(s) for s in run.config.get("seeds", ())
                 if f"seed{s}/train/acc" in names]
        if not seeds:
            continue
        if point in hist:
            raise ValueError(
                f"runs {owner[point]!r} and {run.name!r} are both at noise={point[0]}, "
                f"c={point[1]}; report them separately (one sweep per model/dataset)")
        owner[point] = run.name
        classes = int(run.get_meta("num_classes") or classes)
        hist[point] = {s: {"train_acc": run.history(f"seed{s}/train/acc"),
                           "test_acc": run.history(f"seed{s}/test/acc"),
                           "corrupt_fit": run.history(
                               f"seed{s}/learned_at/frac_learned_corrupt")} for s in seeds}
    return dict(sorted(hist.items())), classes


def draw_report(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Grid, overfit and table figures plus ``summary.md``, ``verdict.md`` (with the rule),
    ``verdict.json``; returns the PNG paths."""
    hist, k = collect(runs)
    if not hist:
        raise ValueError("no winsorize run has evaluations yet; run the experiment or sweep "
                         "first (graddyn sweep coherent-gradients.winsorize --grid c=0,1 ...)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, table = verdicts(hist, k), summary_rows(hist, k)
    cfg = runs[0].config
    seeds = sorted({s for by_seed in hist.values() for s in by_seed})
    params = {"seeds": ",".join(map(str, seeds)), "dataset": cfg.get("dataset"),
              "model": cfg.get("model"), "preprocess": cfg.get("preprocess"),
              "steps": runs[0].get_meta("total_steps"),
              "training images": runs[0].get_meta("train_size"),
              "differs from the study's default config": departures(
                  {k: v for k, v in cfg.items() if k not in ("noise", "c")}, _default_config()),
              **PARAMS}
    write_verdicts(out_dir, rows, params)
    (out_dir / "summary.md").write_text(summary_markdown(table))
    title = f"{cfg.get('model', 'mlp')} on {cfg.get('dataset', '?')}, {len(seeds)} seeds"
    mean = mean_histories(hist)
    return [grid_figure(mean, k, title, out_dir / "winsorize-grid.png"),
            overfit_figure(mean, k, title, out_dir / "winsorize-overfit.png"),
            table_figure(table, out_dir / "winsorize-summary.png"),
            verdict_figure(rows, out_dir / "winsorize-verdict.png")]


def _default_config() -> Any:
    from graddyn.experiments.winsorize import WinsorizeConfig  # the experiment imports us

    return WinsorizeConfig()


def mean_histories(hist: Histories) -> dict[Point, dict[str, Curve]]:
    """Each point's curves averaged over its seeds (the first seed's steps; seeds share the
    evaluation schedule) for the figures."""
    out: dict[Point, dict[str, Curve]] = {}
    for p, seeds in hist.items():
        first = next(iter(seeds.values()))
        out[p] = {n: (first[n][0], np.mean([h[n][1] for h in seeds.values()], axis=0))
                  for n in ("train_acc", "test_acc")}
    return out


# ---- figures ------------------------------------------------------------------------------
def grid_figure(hist: MeanHistories, k: int, title: str, path: Path) -> Path:
    """The paper's grid: rows = noise, columns = c; training accuracy, test accuracy and
    overfit over steps; dashed: the proper accuracy 1 - eps + eps/K."""
    levels, cs = sorted({p[0] for p in hist}), sorted({p[1] for p in hist})
    fig, axes = new_figure(len(levels), len(cs), size=(2.8, 2.2))
    for r, eps in enumerate(levels):
        for col, c in enumerate(cs):
            ax = axes[r, col]
            if (eps, c) not in hist:
                ax.set_visible(False)
                continue
            h = hist[(eps, c)]
            ax.plot(*h["train_acc"], color="tab:blue", label="train acc")
            ax.plot(*h["test_acc"], color="tab:orange", label="test acc")
            ax.plot(*overfit_curve(h, eps, k), color="tab:green", label="overfit")
            ax.axhline(proper_accuracy(eps, k), color="grey", linestyle="--", linewidth=0.8,
                       label="proper acc")
            ax.set_ylim(-0.15, 1.05)
            ax.set_title(f"noise {round(100 * eps)} %, c = {c}", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("accuracy / overfit", fontsize=7)
            if r == len(levels) - 1:
                ax.set_xlabel("step", fontsize=7)
    next(ax for ax in axes.flat if ax.get_visible()).legend(fontsize=6)
    fig.suptitle(f"winsorized SGD, {title}", fontsize=9)
    return save_figure(fig, path)


def overfit_figure(hist: MeanHistories, k: int, title: str, path: Path) -> Path:
    """Overfit over steps, one panel per noise level, one line per c (prediction 2)."""
    from matplotlib import colormaps

    levels, cs = sorted({p[0] for p in hist}), sorted({p[1] for p in hist})
    cmap = colormaps["viridis"]
    fig, axes = new_figure(1, len(levels), size=(3.4, 2.6))
    for ax, eps in zip(axes[0], levels):
        for i, c in enumerate(cs):
            if (eps, c) in hist:
                ax.plot(*overfit_curve(hist[(eps, c)], eps, k), label=f"c = {c}",
                        color=cmap(0.9 * i / max(1, len(cs) - 1)))
        ax.set_title(f"overfit, noise {round(100 * eps)} %", fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("overfit", fontsize=7)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"winsorized SGD, {title}", fontsize=9)
    return save_figure(fig, path)


def _table(cells: list[list[str]], header: Sequence[str], widths: Sequence[float],
           path: Path, width: float, row_height: float, scale: float) -> Path:
    fig, axes = new_figure(1, 1, size=(width, 0.5 + row_height * len(cells)))
    ax = axes[0, 0]
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=list(header), colWidths=list(widths),
                     loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, scale)
    return save_figure(fig, path)


def table_figure(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """The summary table as an image, so the HTML report (images only) carries it."""
    cells = [[_cell(r[k]) for k in SUMMARY_COLUMNS] for r in rows]
    n = len(SUMMARY_COLUMNS)
    return _table(cells, SUMMARY_COLUMNS, [1.0 / n] * n, path, 14.0, 0.3, 1.4)


def verdict_figure(rows: Sequence[Verdict], path: Path) -> Path:
    """The verdict table as an image."""
    import textwrap

    cells = [[textwrap.fill(r.prediction, 30), r.verdict, textwrap.fill(r.evidence, 75),
              textwrap.fill(r.rule, 28)] for r in rows]
    lines = max(1, max(c.count("\n") + 1 for row in cells for c in row))
    return _table(cells, ["prediction", "verdict", "evidence", "rule"],
                  [0.22, 0.07, 0.5, 0.21], path, 11.0, 0.18 * lines, 0.9 * lines)
