"""Report of ``coherent-gradients.label-noise``: one figure per quantity (one line per noise
level, mean over seeds, as in Chatterjee, ICLR 2020, Figs. 1-3) and a verdict table on the
paper's qualitative predictions, computed from the recorded histories of every seed with the
rules of ``_stats`` (never hard-coded).

Histories are ``{seed: {noise fraction: {metric name: (steps (T,), values (T,))}}}`` with
metric names without the ``seed<s>/noise<pct>/`` prefix; ``verdicts`` is a pure function of
them, so it is tested on synthetic histories.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from graddyn.experiments._stats import (
    absence_verdict,
    all_of,
    effect_verdict,
    mean_ci,
    paired_diff,
)
from graddyn.experiments._verdicts import (  # noqa: F401  (re-exported)
    Verdict,
    departures,
    end_value,
    mean_over_steps,
    not_tested,
    verdict_markdown,
    write_verdicts,
)
from graddyn.train import Run, new_figure, save_figure

Curve = tuple[np.ndarray, np.ndarray]  # (steps (T,), values (T,))
Levels = Mapping[float, Mapping[str, Curve]]
Histories = Mapping[int, Levels]  # seed -> noise fraction -> metric -> curve
MeanHistories = Mapping[float, Mapping[str, Curve]]  # seed-mean curves, for the figures

# Parameters of the verdicts (written into the verdict file).
FIT_ACC = 0.95  # (3) "~100 % training accuracy": end training accuracy above this
NEAR_CLEAN = 0.05  # (2b) pristine rate within this of the 0 % run's (absence margin)
END_WINDOW = 3  # "end" of a curve: median of its last evaluations (one collapse ignored)
PARAMS = {"fit threshold": FIT_ACC, "near-clean margin": NEAR_CLEAN,
          "end of a curve": f"median of the last {END_WINDOW} evaluations",
          "learning speed": "step-weighted mean of the accuracy curve over training"}

METRICS = ("fit/train_acc", "fit/test_acc", "fit/train_loss", "learned_at/frac_learned",
           "learned_at/frac_learned_pristine", "learned_at/frac_learned_corrupt",
           "group_split/f_p", "group_split/f_c", "group_split/mean_p", "group_split/mean_c",
           "batch_coherence/alpha", "batch_coherence/m_coherence")


def collect(runs: list[Run]) -> dict[int, dict[float, dict[str, Curve]]]:
    """Histories of every (seed, noise level) of every run (a sweep may split them)."""
    out: dict[int, dict[float, dict[str, Curve]]] = {}
    for run in runs:
        names = set(run.metric_names())
        for seed in run.config.get("seeds", ()):
            for frac in run.config.get("noise_levels", ()):
                tag = f"seed{seed}/noise{round(100 * frac)}/"
                wanted = [n for n in names if n.startswith(tag)]
                if wanted:
                    out.setdefault(int(seed), {})[float(frac)] = {
                        n[len(tag):]: run.history(n) for n in wanted}
    return {s: dict(sorted(v.items())) for s, v in sorted(out.items())}


def _pct(f: float) -> str:
    return f"{round(100 * f)} %"


def per_seed(hist: Histories, level: float, fn: Callable[[Mapping[str, Curve]], float]
             ) -> np.ndarray:
    """``fn`` of each seed's histories at ``level`` -> (S,) (NaN where a seed lacks it)."""
    return np.array([fn(h[level]) if level in h else np.nan for h in hist.values()], float)


def _levels(hist: Histories) -> list[float]:
    return sorted({f for h in hist.values() for f in h})


def _auc(name: str) -> Callable[[Mapping[str, Curve]], float]:
    return lambda h: mean_over_steps(h[name]) if name in h else float("nan")


def _end(name: str) -> Callable[[Mapping[str, Curve]], float]:
    return lambda h: end_value(h.get(name), END_WINDOW)


def _decreasing(hist: Histories, levels: list[float], fn: Callable) -> tuple[str, str]:
    """Each adjacent pair of levels: the paired (by seed) drop from the lower noise level to
    the higher is positive. Returns (verdict, evidence)."""
    words, parts = [], []
    for lo, hi in zip(levels, levels[1:]):
        est = paired_diff(per_seed(hist, lo, fn), per_seed(hist, hi, fn))
        words.append(effect_verdict(est, +1))
        parts.append(f"{_pct(lo)} - {_pct(hi)}: {est}")
    return all_of(words), "; ".join(parts)


def _levels_line(hist: Histories, levels: list[float], fn: Callable) -> str:
    return ", ".join(f"{_pct(f)} {mean_ci(per_seed(hist, f, fn))}" for f in levels)


def verdicts(hist: Histories) -> list[Verdict]:
    """The paper's predictions checked on ``hist`` over its seeds (rules: ``_stats``)."""
    levels = _levels(hist)
    return [_slower(hist, levels), _pristine_first(hist, levels), _near_clean(hist, levels),
            _fit_all(hist, levels), _beyond_null(hist, levels)]


def _slower(hist: Histories, levels: list[float]) -> Verdict:
    name = "(1) more noise learns more slowly"
    if len(levels) < 2:
        return not_tested(name, "needs two noise levels")
    fn = _auc("fit/train_acc")
    word, diffs = _decreasing(hist, levels, fn)
    return Verdict(
        name, word, "mean training accuracy over training: " + _levels_line(hist, levels, fn)
        + "; drop between adjacent levels: " + diffs,
        "every adjacent drop > 0 (paired by seed)")


def _mixed(hist: Histories, levels: list[float]) -> list[float]:
    return [f for f in levels if 0.0 < f < 1.0]


def _pristine_first(hist: Histories, levels: list[float]) -> Verdict:
    name = "(2) pristine examples are learned faster than corrupt ones"
    mixed = _mixed(hist, levels)
    if not mixed:
        return not_tested(name, "needs a level strictly between 0 and 100 %")
    words, parts = [], []
    for f in mixed:
        est = paired_diff(per_seed(hist, f, _auc("learned_at/frac_learned_pristine")),
                          per_seed(hist, f, _auc("learned_at/frac_learned_corrupt")))
        words.append(effect_verdict(est, +1))
        parts.append(f"{_pct(f)}: pristine - corrupt {est}")
    return Verdict(name, all_of(words), "mean fraction learned over training, "
                   + "; ".join(parts), "pristine - corrupt > 0 at every mixed level")


def _near_clean(hist: Histories, levels: list[float]) -> Verdict:
    name = "(2b) pristine examples are learned at about the 0 % run's rate"
    mixed = _mixed(hist, levels)
    if not mixed or 0.0 not in levels:
        return not_tested(name, "needs the 0 % level and a level strictly between 0 and 100 %")
    clean = per_seed(hist, 0.0, _auc("learned_at/frac_learned"))
    words, parts = [], []
    for f in mixed:
        est = paired_diff(per_seed(hist, f, _auc("learned_at/frac_learned_pristine")), clean)
        words.append(absence_verdict(est, NEAR_CLEAN))
        parts.append(f"{_pct(f)}: pristine - 0 % run {est}")
    return Verdict(name, all_of(words), "mean fraction learned over training, "
                   + "; ".join(parts), f"|pristine - 0 % run| < {NEAR_CLEAN} at every mixed level")


def _fit_all(hist: Histories, levels: list[float]) -> Verdict:
    name = "(3) every level reaches ~100 % training accuracy while test accuracy falls"
    if len(levels) < 2:
        return not_tested(name, "needs two noise levels")
    train = _end("fit/train_acc")
    fits = [effect_verdict(mean_ci(per_seed(hist, f, train) - FIT_ACC), +1) for f in levels]
    test = _end("fit/test_acc")
    falls, diffs = _decreasing(hist, levels, test)
    return Verdict(
        name, all_of([*fits, falls]),
        "end training accuracy: " + _levels_line(hist, levels, train)
        + "; end test accuracy: " + _levels_line(hist, levels, test) + "; test drop between "
        "adjacent levels: " + diffs,
        f"end train accuracy > {FIT_ACC} at every level; every adjacent test drop > 0")


def _null_gap(h: Mapping[str, Curve]) -> float:
    """f_p minus the largest null-world f_p at the end of the split window."""
    nulls = [h[k][1] for k in h if k.startswith("group_split/null") and k.endswith("/f_p")]
    fp = h.get("group_split/f_p")
    if fp is None or not nulls or not len(fp[1]):
        return float("nan")
    return float(fp[1][-1] - np.max([n[-1] for n in nulls]))


def _beyond_null(hist: Histories, levels: list[float]) -> Verdict:
    name = "(4) pristine share of the loss reduction f_p beats the null worlds"
    mixed = [f for f in _mixed(hist, levels)
             if any("group_split/f_p" in h.get(f, {}) for h in hist.values())]
    if not mixed:
        return not_tested(name, "needs a level strictly between 0 and 100 % with f_p")
    words, parts = [], []
    for f in mixed:
        est = mean_ci(per_seed(hist, f, _null_gap))
        words.append(effect_verdict(est, +1))
        parts.append(f"{_pct(f)}: f_p - max null f_p {est}")
    return Verdict(name, all_of(words), "cumulative over the split window, "
                   + "; ".join(parts), "f_p - max null f_p > 0 at the end of the split window, "
                   "every mixed level")


def level_table(hist: Histories) -> str:
    """Markdown: per noise level, end train / test accuracy and learning speed, mean ± 95 %
    interval over seeds."""
    cols = [("end train acc", _end("fit/train_acc")), ("end test acc", _end("fit/test_acc")),
            ("mean train acc over training", _auc("fit/train_acc")),
            ("pristine learned (mean)", _auc("learned_at/frac_learned_pristine")),
            ("corrupt learned (mean)", _auc("learned_at/frac_learned_corrupt"))]
    lines = ["| noise | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for f in _levels(hist):
        cells = [str(mean_ci(per_seed(hist, f, fn))) for _, fn in cols]
        lines.append(f"| {_pct(f)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _default_config() -> Any:
    from graddyn.experiments.label_noise import LabelNoiseConfig  # the experiment imports us

    return LabelNoiseConfig()


def mean_histories(hist: Histories) -> dict[float, dict[str, Curve]]:
    """Curves averaged over seeds (where the seeds share their steps; else the first seed's)
    for the figures: ``{noise fraction: {metric: curve}}``."""
    out: dict[float, dict[str, Curve]] = {}
    for f in _levels(hist):
        seeds = [h[f] for h in hist.values() if f in h]
        for name in seeds[0]:
            curves = [h[name] for h in seeds if name in h]
            same = all(np.array_equal(c[0], curves[0][0]) for c in curves)
            vals = np.mean([c[1] for c in curves], axis=0) if same else curves[0][1]
            out.setdefault(f, {})[name] = (curves[0][0], vals)
    return out


def draw_report(runs: list[Run], out_dir: Path) -> list[Path]:
    """Every figure plus the verdict (PNG table, ``verdict.md`` with the rule, ``verdict.json``)
    and ``levels.md`` (per-level numbers with intervals)."""
    hist = collect(runs)
    if not hist:
        raise ValueError("no label-noise metrics in these runs; run the experiment first")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = verdicts(hist)
    cfg = runs[0].config
    params = {"seeds": ",".join(map(str, hist)), "n": len(hist),
              "dataset": cfg.get("dataset"), "preprocess": cfg.get("preprocess"),
              "steps per level": runs[0].get_meta("total_steps"),
              "differs from the study's default config": departures(cfg, _default_config()),
              **PARAMS}
    write_verdicts(out_dir, rows, params)
    (out_dir / "levels.md").write_text(level_table(hist))
    mean = mean_histories(hist)
    panels = [
        ("train-acc", [("fit/train_acc", "training accuracy (noisy labels)")]),
        ("test-acc", [("fit/test_acc", "test accuracy")]),
        ("train-loss", [("fit/train_loss", "training loss (whole training set)")]),
        ("coherence", [("batch_coherence/alpha", "alpha (minibatch)"),
                       ("batch_coherence/m_coherence", "m-coherence (minibatch)")]),
    ]
    paths = [_verdict_figure(rows, out_dir / "label-noise-verdict.png")]
    paths += [_lines(mean, spec, out_dir / f"label-noise-{name}.png") for name, spec in panels]
    paths.append(_learned(mean, out_dir / "label-noise-learned.png"))
    paths.append(_split(mean, ("f_p", "f_c"), out_dir / "label-noise-split.png"))
    paths.append(_split(mean, ("mean_p", "mean_c"), out_dir / "label-noise-per-example.png"))
    return paths


def _colors(levels: list[float]) -> dict[float, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return {f: cmap(0.9 * i / max(1, len(levels) - 1)) for i, f in enumerate(levels)}


def _lines(hist: MeanHistories, spec: list[tuple[str, str]], path: Path) -> Path:
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


def _learned(hist: MeanHistories, path: Path) -> Path:
    """Fraction of pristine (solid) and corrupt (dashed) training examples learned."""
    fig, axes = new_figure(1, 1, size=(5.0, 3.4))
    ax, colors = axes[0, 0], _colors(list(hist))
    for f, h in hist.items():
        for group, style in (("pristine", "-"), ("corrupt", "--")):
            curve = h.get(f"learned_at/frac_learned_{group}")
            if curve is not None and len(curve[0]) and not np.isnan(curve[1]).all():
                ax.plot(*curve, style, color=colors[f], label=f"{round(100 * f)} % {group}")
    ax.set_title("fraction learned (solid pristine, dashed corrupt; mean over seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of the group learned", fontsize=8)
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path)


def _split(hist: MeanHistories, keys: tuple[str, str], path: Path) -> Path:
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

    fig, axes = new_figure(1, 1, size=(11.0, 0.5 + 1.4 * len(rows)))
    ax = axes[0, 0]
    ax.axis("off")
    cells = [[textwrap.fill(r.prediction, 30), r.verdict, textwrap.fill(r.evidence, 70),
              textwrap.fill(r.rule, 28)] for r in rows]
    table = ax.table(cellText=cells, colLabels=["prediction", "verdict", "evidence",
                                                "rule"],
                     colWidths=[0.22, 0.07, 0.5, 0.21], loc="center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1, 4.4)
    return save_figure(fig, path)
