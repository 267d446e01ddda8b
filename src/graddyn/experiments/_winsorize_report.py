"""Report of ``coherent-gradients.winsorize``: the paper's grid (Chatterjee, ICLR 2020,
Section 3, Fig. 4: training accuracy, test accuracy and overfit over steps, one panel per
(noise, c)), a summary table, and verdicts on the paper's three predictions computed from the
recorded histories with the thresholds below (never hard-coded outcomes).

Histories are ``{(noise, c): {name: (steps (T,), values (T,))}}`` with names ``train_acc``,
``test_acc`` and optionally ``corrupt_fit``; ``verdicts`` and ``summary_rows`` are pure
functions of them, so they are tested on synthetic histories.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from graddyn.experiments._verdicts import (  # noqa: F401  (re-exported)
    Verdict,
    mean_over_steps,
    verdict_markdown,
)
from graddyn.experiments._verdicts import final_value as _final
from graddyn.train import Run, new_figure, save_figure

Curve = tuple[np.ndarray, np.ndarray]  # (steps (T,), values (T,))
Point = tuple[float, int]  # (noise fraction eps, c)
Histories = Mapping[Point, Mapping[str, Curve]]

# Thresholds of the verdicts (stated in the verdict table).
PROPER_TOL = 0.02  # (1) peak training accuracy may exceed the proper accuracy by this much
OVERFIT_TOL = 0.01  # (2) mean overfit may rise by at most this from one c to the next larger
PEAK_DROP = 0.02  # (3) final training accuracy at least this far below its peak


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


def _peak(curve: Curve | None) -> float:
    return float(np.max(curve[1])) if curve is not None and len(curve[1]) else float("nan")


def overfit_curve(hist: Histories, point: Point, num_classes: int = 10) -> Curve:
    """Overfit over the steps where both accuracies were evaluated."""
    (s_tr, tr), (s_te, te) = hist[point]["train_acc"], hist[point]["test_acc"]
    steps, i, j = np.intersect1d(s_tr, s_te, return_indices=True)
    return steps, overfit_measure(np.asarray(tr)[i], np.asarray(te)[j], point[0], num_classes)


def _label(point: Point) -> str:
    return f"{round(100 * point[0])} %/c={point[1]}"


# ---- verdicts ---------------------------------------------------------------------------
def verdicts(hist: Histories, num_classes: int = 10) -> list[Verdict]:
    """The paper's three predictions checked on ``hist`` (thresholds: module constants)."""
    return [_below_proper(hist, num_classes), _overfit_slower(hist, num_classes),
            _peak_then_fall(hist)]


def _below_proper(hist: Histories, k: int) -> Verdict:
    name = "(1) for c > 0 training accuracy does not exceed the proper accuracy 1 - eps + eps/K"
    tested = sorted(p for p in hist if p[1] > 0 and p[0] > 0)
    if not tested:
        return Verdict(name, None, "needs a point with c > 0 and noise > 0", "")
    ok: bool | None = True
    parts = []
    for p in tested:
        peak, proper = _peak(hist[p]["train_acc"]), proper_accuracy(p[0], k)
        ok = ok and bool(peak <= proper + PROPER_TOL)
        parts.append(f"{_label(p)}: peak {peak:.3f} vs proper {proper:.3f}")
    plain = [p for p in sorted(hist) if p[1] == 0 and p[0] > 0]
    memorised = [p for p in plain if _peak(hist[p]["train_acc"]) > proper_accuracy(p[0], k)
                 + PROPER_TOL]
    if plain and not memorised:  # the control never got there either: too short to tell
        ok = None
    contrast = "; plain SGD (c=0) peaks " + ", ".join(
        f"{_label(p)}: {_peak(hist[p]['train_acc']):.3f}" for p in plain) if plain else ""
    return Verdict(name, ok, "peak training accuracy, " + "; ".join(parts) + contrast,
                   f"peak <= proper + {PROPER_TOL} at every c > 0, noise > 0 point; n/a if "
                   "no c = 0 run at noise > 0 exceeds it either (too short to tell)")


def _overfit_slower(hist: Histories, k: int) -> Verdict:
    name = "(2) overfit grows more slowly as c grows"
    levels = sorted({p[0] for p in hist})
    ok, parts, tested = True, [], False
    for eps in levels:
        cs = sorted(p[1] for p in hist if p[0] == eps)
        if len(cs) < 2:
            continue
        tested = True
        means = [mean_over_steps(overfit_curve(hist, (eps, c), k)) for c in cs]
        finals = [_final(overfit_curve(hist, (eps, c), k)) for c in cs]
        ok &= all(b <= a + OVERFIT_TOL for a, b in zip(means, means[1:]))
        parts.append(f"{round(100 * eps)} % (c={','.join(map(str, cs))}): mean "
                     + ", ".join(f"{m:.3f}" for m in means) + "; final "
                     + ", ".join(f"{f:.3f}" for f in finals))
    if not tested:
        return Verdict(name, None, "needs two c values at one noise level", "")
    return Verdict(name, ok, "overfit over training, " + "; ".join(parts),
                   f"mean overfit non-increasing in c (each rise <= {OVERFIT_TOL}) at every "
                   "noise level")


def _peak_then_fall(hist: Histories) -> Verdict:
    """Training accuracy, not test: plain SGD's test accuracy also peaks and falls under
    label noise (memorisation), while its training accuracy never falls; a falling training
    accuracy is the signature of winsorization starving the update."""
    name = "(3) strong winsorization (largest c) makes accuracy peak and then fall"
    c_max = max((p[1] for p in hist), default=0)
    tested = sorted(p for p in hist if p[1] == c_max)
    if c_max == 0:
        return Verdict(name, None, "needs a c > 0 point", "")
    ok, parts = True, []
    for p in tested:
        h = hist[p]
        drop_tr = _peak(h["train_acc"]) - _final(h["train_acc"])
        drop_te = _peak(h["test_acc"]) - _final(h["test_acc"])
        ok &= bool(drop_tr >= PEAK_DROP)
        parts.append(f"{_label(p)}: train peak {_peak(h['train_acc']):.3f} -> final "
                     f"{_final(h['train_acc']):.3f} (drop {drop_tr:.3f}; test drop "
                     f"{drop_te:.3f})")
    plain = [f"{_label(p)}: {_peak(hist[p]['test_acc']) - _final(hist[p]['test_acc']):.3f}"
             for p in sorted(hist) if p[1] == 0]
    contrast = ("; plain SGD test drop " + ", ".join(plain)) if plain else ""
    return Verdict(name, ok, "; ".join(parts) + contrast,
                   f"training accuracy peak - final >= {PEAK_DROP} at c = {c_max}, every "
                   "noise level")


# ---- summary table ----------------------------------------------------------------------
SUMMARY_COLUMNS = ("noise", "c", "proper_acc", "train_acc", "peak_train_acc", "test_acc",
                   "peak_test_acc", "overfit", "mean_overfit", "corrupt_fit", "steps")


def summary_rows(hist: Histories, num_classes: int = 10) -> list[dict[str, float]]:
    """One row per (noise, c): final and peak accuracies, final and mean overfit, the final
    fraction of corrupt examples fit to their wrong label (memorisation), last step."""
    rows = []
    for p in sorted(hist):
        h, over = hist[p], overfit_curve(hist, p, num_classes)
        rows.append({
            "noise": p[0], "c": p[1], "proper_acc": proper_accuracy(p[0], num_classes),
            "train_acc": _final(h["train_acc"]), "peak_train_acc": _peak(h["train_acc"]),
            "test_acc": _final(h["test_acc"]), "peak_test_acc": _peak(h["test_acc"]),
            "overfit": _final(over), "mean_overfit": mean_over_steps(over),
            "corrupt_fit": _final(h.get("corrupt_fit")),
            "steps": int(h["train_acc"][0][-1]) if len(h["train_acc"][0]) else 0,
        })
    return rows


def summary_markdown(rows: Sequence[Mapping[str, float]]) -> str:
    def fmt(v: float) -> str:
        return str(v) if isinstance(v, int) else f"{v:.3f}"

    lines = ["| " + " | ".join(SUMMARY_COLUMNS) + " |", "|" + "---|" * len(SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in SUMMARY_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# ---- collecting runs --------------------------------------------------------------------
def collect(runs: Sequence[Run]) -> tuple[dict[Point, dict[str, Curve]], int]:
    """Histories of every run keyed by (noise, c), and the number of classes. Runs with no
    evaluation yet are left out; two runs at the same (noise, c) are an error."""
    hist: dict[Point, dict[str, Curve]] = {}
    owner: dict[Point, str] = {}
    classes = 10
    for run in runs:
        if "train/acc" not in run.metric_names():
            continue
        point = (float(run.config["noise"]), int(run.config["c"]))
        if point in hist:
            raise ValueError(
                f"runs {owner[point]!r} and {run.name!r} are both at noise={point[0]}, "
                f"c={point[1]}; report them separately (one sweep per model/dataset/seed)")
        owner[point] = run.name
        classes = int(run.get_meta("num_classes") or classes)
        hist[point] = {"train_acc": run.history("train/acc"),
                       "test_acc": run.history("test/acc"),
                       "corrupt_fit": run.history("learned_at/frac_learned_corrupt")}
    return dict(sorted(hist.items())), classes


def draw_report(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """Grid, overfit and table figures plus ``summary.md``, ``verdict.md``,
    ``verdict.json``; returns the PNG paths."""
    hist, k = collect(runs)
    if not hist:
        raise ValueError("no winsorize run has evaluations yet; run the experiment or sweep "
                         "first (graddyn sweep coherent-gradients.winsorize --grid c=0,1 ...)")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, table = verdicts(hist, k), summary_rows(hist, k)
    (out_dir / "verdict.md").write_text(verdict_markdown(rows))
    (out_dir / "verdict.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    (out_dir / "summary.md").write_text(summary_markdown(table))
    cfg = runs[0].config
    title = f"{cfg.get('model', 'mlp')} on {cfg.get('dataset', '?')}"
    return [grid_figure(hist, k, title, out_dir / "winsorize-grid.png"),
            overfit_figure(hist, k, title, out_dir / "winsorize-overfit.png"),
            table_figure(table, out_dir / "winsorize-summary.png"),
            verdict_figure(rows, out_dir / "winsorize-verdict.png")]


# ---- figures ------------------------------------------------------------------------------
def grid_figure(hist: Histories, k: int, title: str, path: Path) -> Path:
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
            ax.plot(*overfit_curve(hist, (eps, c), k), color="tab:green", label="overfit")
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


def overfit_figure(hist: Histories, k: int, title: str, path: Path) -> Path:
    """Overfit over steps, one panel per noise level, one line per c (prediction 2)."""
    from matplotlib import colormaps

    levels, cs = sorted({p[0] for p in hist}), sorted({p[1] for p in hist})
    cmap = colormaps["viridis"]
    fig, axes = new_figure(1, len(levels), size=(3.4, 2.6))
    for ax, eps in zip(axes[0], levels):
        for i, c in enumerate(cs):
            if (eps, c) in hist:
                ax.plot(*overfit_curve(hist, (eps, c), k), label=f"c = {c}",
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


def table_figure(rows: Sequence[Mapping[str, float]], path: Path) -> Path:
    """The summary table as an image, so the HTML report (images only) carries it."""
    cells = [[str(r[k]) if isinstance(r[k], int) else f"{r[k]:.3f}" for k in SUMMARY_COLUMNS]
             for r in rows]
    n = len(SUMMARY_COLUMNS)
    return _table(cells, SUMMARY_COLUMNS, [1.0 / n] * n, path, 11.0, 0.3, 1.4)


def verdict_figure(rows: Sequence[Verdict], path: Path) -> Path:
    """The verdict table as an image."""
    import textwrap

    mark = {True: "holds", False: "FAILS", None: "n/a"}
    cells = [[textwrap.fill(r.prediction, 30), mark[r.holds], textwrap.fill(r.evidence, 75),
              textwrap.fill(r.threshold, 28)] for r in rows]
    lines = max(1, max(c.count("\n") + 1 for row in cells for c in row))
    return _table(cells, ["prediction", "verdict", "evidence", "threshold"],
                  [0.22, 0.07, 0.5, 0.21], path, 11.0, 0.18 * lines, 0.9 * lines)
