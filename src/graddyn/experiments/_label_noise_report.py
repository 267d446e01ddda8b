"""Report of ``coherent-gradients.label-noise``: one figure per quantity (one line per noise
level, as in Chatterjee, ICLR 2020, Figs. 1-3) and a verdict table on the paper's
qualitative predictions, computed from the recorded histories (never hard-coded).

Histories are ``{noise fraction: {metric name: (steps (T,), values (T,))}}`` with metric
names without the ``noise<pct>/`` prefix; ``verdicts`` is a pure function of them, so it is
tested on synthetic histories.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np

from graddyn.experiments._verdicts import (  # noqa: F401  (re-exported)
    Verdict,
    mean_over_steps,
    verdict_markdown,
)
from graddyn.experiments._verdicts import final_value as _final
from graddyn.train import Run, new_figure, save_figure

Curve = tuple[np.ndarray, np.ndarray]  # (steps (T,), values (T,))
Histories = Mapping[float, Mapping[str, Curve]]

# Thresholds of the verdicts (stated in the table).
FIT_ACC = 0.95  # "~100 % training accuracy": final training accuracy at least this
LEARN_MARGIN = 0.10  # pristine minus corrupt mean fraction learned, at least this
NEAR_CLEAN = 0.90  # pristine mean fraction learned >= this x the 0 % run's
NULL_MARGIN = 0.05  # f_p minus the largest null-world f_p, at least this

METRICS = ("fit/train_acc", "fit/test_acc", "fit/train_loss", "learned_at/frac_learned",
           "learned_at/frac_learned_pristine", "learned_at/frac_learned_corrupt",
           "group_split/f_p", "group_split/f_c", "group_split/mean_p", "group_split/mean_c",
           "batch_coherence/alpha", "batch_coherence/m_coherence")


def collect(runs: list[Run]) -> dict[float, dict[str, Curve]]:
    """Histories of every noise level of every run (a sweep may split levels over runs)."""
    out: dict[float, dict[str, Curve]] = {}
    for run in runs:
        names = set(run.metric_names())
        for frac in run.config.get("noise_levels", ()):
            tag = f"noise{round(100 * frac)}/"
            wanted = [n for n in names if n.startswith(tag)]
            if wanted:
                out[float(frac)] = {n[len(tag):]: run.history(n) for n in wanted}
    return dict(sorted(out.items()))


def _strictly_decreasing(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:]))


def _pct(levels: list[float]) -> str:
    return "/".join(f"{round(100 * f)}" for f in levels) + " %"


def verdicts(hist: Histories) -> list[Verdict]:
    """The paper's predictions checked on ``hist`` (see the module thresholds)."""
    levels = sorted(hist)
    return [_slower(hist, levels), _pristine_first(hist, levels), _fit_all(hist, levels),
            _beyond_null(hist, levels)]


def _slower(hist: Histories, levels: list[float]) -> Verdict:
    auc = [mean_over_steps(hist[f].get("fit/train_acc", ([], []))) for f in levels]
    return Verdict(
        "(1) more noise learns more slowly", _strictly_decreasing(auc) if len(auc) > 1 else None,
        f"mean training accuracy over training at {_pct(levels)}: "
        + ", ".join(f"{a:.3f}" for a in auc),
        "strictly decreasing with noise")


def _pristine_first(hist: Histories, levels: list[float]) -> Verdict:
    mixed = [f for f in levels if 0.0 < f < 1.0]
    if not mixed:
        return Verdict("(2) pristine learned faster than corrupt, near the 0 % rate", None,
                       "needs a level strictly between 0 and 100 %", "")
    clean = mean_over_steps(hist[0.0]["learned_at/frac_learned"]) if 0.0 in hist else None
    ok, parts = True, []
    for f in mixed:
        p = mean_over_steps(hist[f]["learned_at/frac_learned_pristine"])
        c = mean_over_steps(hist[f]["learned_at/frac_learned_corrupt"])
        ok &= p - c >= LEARN_MARGIN and (clean is None or p >= NEAR_CLEAN * clean)
        parts.append(f"{round(100 * f)} %: pristine {p:.3f} vs corrupt {c:.3f}")
    ref = f"; 0 % run {clean:.3f}" if clean is not None else "; no 0 % run to compare"
    return Verdict(
        "(2) pristine learned faster than corrupt, near the 0 % rate", ok,
        "mean fraction learned over training, " + "; ".join(parts) + ref,
        f"pristine - corrupt >= {LEARN_MARGIN}; pristine >= {NEAR_CLEAN} x 0 % run")


def _fit_all(hist: Histories, levels: list[float]) -> Verdict:
    train = [_final(hist[f].get("fit/train_acc")) for f in levels]
    test = [_final(hist[f].get("fit/test_acc")) for f in levels]
    ok = all(a >= FIT_ACC for a in train) and _strictly_decreasing(test)
    return Verdict(
        "(3) every level reaches ~100 % training accuracy while test accuracy falls", ok,
        f"final train acc at {_pct(levels)}: " + ", ".join(f"{a:.3f}" for a in train)
        + "; final test acc: " + ", ".join(f"{a:.3f}" for a in test),
        f"train >= {FIT_ACC} at every level; test strictly decreasing with noise")


def _beyond_null(hist: Histories, levels: list[float]) -> Verdict:
    mixed = [f for f in levels if 0.0 < f < 1.0 and "group_split/f_p" in hist[f]]
    name = "(4) pristine share of the loss reduction f_p beats the null worlds"
    if not mixed:
        return Verdict(name, None, "needs a level strictly between 0 and 100 % with f_p", "")
    ok, parts = True, []
    for f in mixed:
        h = hist[f]
        steps, fp = h["group_split/f_p"]
        nulls = [h[k][1] for k in h if k.startswith("group_split/null") and k.endswith("/f_p")]
        if not nulls or not len(fp):
            ok = False
            continue
        gap = np.asarray(fp) - np.max(np.stack(nulls), axis=0)  # (T,) f_p - max null
        ok &= bool(gap[-1] >= NULL_MARGIN)
        peak = int(np.nanargmax(gap))
        parts.append(f"{round(100 * f)} %: f_p {fp[-1]:.3f} vs null max "
                     f"{fp[-1] - gap[-1]:.3f} at step {int(steps[-1])} (largest lead "
                     f"{gap[peak]:+.3f} at step {int(steps[peak])})")
    return Verdict(name, ok, "cumulative f_p, " + "; ".join(parts),
                   f"f_p - max null f_p >= {NULL_MARGIN} at the end of the split window")


def draw_report(runs: list[Run], out_dir: Path) -> list[Path]:
    """Every figure plus the verdict (PNG table, ``verdict.md``, ``verdict.json``)."""
    hist = collect(runs)
    if not hist:
        raise ValueError("no label-noise metrics in these runs; run the experiment first")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = verdicts(hist)
    (out_dir / "verdict.md").write_text(verdict_markdown(rows))
    (out_dir / "verdict.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    panels = [
        ("train-acc", [("fit/train_acc", "training accuracy (noisy labels)")]),
        ("test-acc", [("fit/test_acc", "test accuracy")]),
        ("train-loss", [("fit/train_loss", "training loss (whole training set)")]),
        ("coherence", [("batch_coherence/alpha", "alpha (minibatch)"),
                       ("batch_coherence/m_coherence", "m-coherence (minibatch)")]),
    ]
    paths = [_verdict_figure(rows, out_dir / "label-noise-verdict.png")]
    paths += [_lines(hist, spec, out_dir / f"label-noise-{name}.png") for name, spec in panels]
    paths.append(_learned(hist, out_dir / "label-noise-learned.png"))
    paths.append(_split(hist, ("f_p", "f_c"), out_dir / "label-noise-split.png"))
    paths.append(_split(hist, ("mean_p", "mean_c"), out_dir / "label-noise-per-example.png"))
    return paths


def _colors(levels: list[float]) -> dict[float, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return {f: cmap(0.9 * i / max(1, len(levels) - 1)) for i, f in enumerate(levels)}


def _lines(hist: Histories, spec: list[tuple[str, str]], path: Path) -> Path:
    fig, axes = new_figure(1, len(spec), size=(4.5, 3.2))
    colors = _colors(list(hist))
    for ax, (name, title) in zip(axes[0], spec):
        for f, h in hist.items():
            if name in h and len(h[name][0]):
                ax.plot(*h[name], color=colors[f], label=f"{round(100 * f)} % noise")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(title.split(" (")[0], fontsize=8)
        if name.startswith("batch_coherence"):
            ax.set_xscale("symlog", linthresh=10)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)


def _learned(hist: Histories, path: Path) -> Path:
    """Fraction of pristine (solid) and corrupt (dashed) training examples learned."""
    fig, axes = new_figure(1, 1, size=(5.0, 3.4))
    ax, colors = axes[0, 0], _colors(list(hist))
    for f, h in hist.items():
        for group, style in (("pristine", "-"), ("corrupt", "--")):
            curve = h.get(f"learned_at/frac_learned_{group}")
            if curve is not None and len(curve[0]) and not np.isnan(curve[1]).all():
                ax.plot(*curve, style, color=colors[f], label=f"{round(100 * f)} % {group}")
    ax.set_title("fraction learned (solid pristine, dashed corrupt)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of the group learned", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def _split(hist: Histories, keys: tuple[str, str], path: Path) -> Path:
    """Cumulative ``keys`` (pristine, corrupt) over the first steps; dotted: null worlds."""
    fig, axes = new_figure(1, 2, size=(4.5, 3.2))
    colors = _colors(list(hist))
    titles = {"f_p": "f_p (pristine share of loss reduction)", "f_c": "f_c (corrupt share)",
              "mean_p": "cumulative mean per pristine example",
              "mean_c": "cumulative mean per corrupt example"}
    for ax, key in zip(axes[0], keys):
        for f, h in hist.items():
            curve = h.get(f"group_split/{key}")
            if curve is None or np.isnan(curve[1]).all():
                continue
            ax.plot(*curve, color=colors[f], label=f"{round(100 * f)} % noise")
            for name in sorted(k for k in h if k.startswith("group_split/null")
                               and k.endswith(f"/{key}")):
                ax.plot(*h[name], ":", color=colors[f], linewidth=0.8)
        ax.set_title(titles[key] + " (dotted: null worlds)", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel(key, fontsize=8)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)


def _verdict_figure(rows: list[Verdict], path: Path) -> Path:
    """The verdict table as an image, so the HTML page (images only) carries it too."""
    import textwrap

    fig, axes = new_figure(1, 1, size=(11.0, 0.5 + 1.0 * len(rows)))
    ax = axes[0, 0]
    ax.axis("off")
    mark = {True: "holds", False: "FAILS", None: "n/a"}
    cells = [[textwrap.fill(r.prediction, 30), mark[r.holds], textwrap.fill(r.evidence, 70),
              textwrap.fill(r.threshold, 28)] for r in rows]
    table = ax.table(cellText=cells, colLabels=["prediction", "verdict", "evidence",
                                                "threshold"],
                     colWidths=[0.22, 0.07, 0.5, 0.21], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, 3.2)
    return save_figure(fig, path)
