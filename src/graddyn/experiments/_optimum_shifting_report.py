"""Figures, the mean +- std table and the generated verdicts of ``optimum-shifting`` (over
seeds, by the rules of ``_stats``).

Reads only the run store: ``<model>/<method>/s<seed>/{end,os}/<metric>`` (before / after post
hoc OS), ``.../curv/<metric>`` and ``.../{train,test}/<metric>`` over training, and
``<model>/tune/...`` for the weight-decay grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graddyn.experiments._stats import effect_verdict, mean_ci, paired_diff
from graddyn.experiments._verdicts import Verdict, verdict_markdown, write_verdicts
from graddyn.train import Run, new_figure, save_figure

METHODS = ("sgd", "wd", "sos")
LABELS = {"sgd": "SGD", "wd": "SGD + tuned WD", "sos": "SGD + SOS"}
FINAL = ("train/loss", "train/acc", "test/acc", "v_norm", "trace", "trace_last", "lambda_max")
CURVES = ("test/acc", "train/loss", "curv/v_norm", "curv/trace", "curv/trace_last")


def _seeds(run: Run, model: str, method: str) -> list[str]:
    """Seed tags (``s0``, ...) of finished (model, method) pairs."""
    done = [
        n for n in run.metric_names() if n.startswith(f"{model}/{method}/") and n.endswith("/done")
    ]
    return sorted(n.split("/")[2] for n in done)


def _models(run: Run) -> list[str]:
    return [m for m in run.config.get("models", []) if _seeds(run, m, "sgd")]


def final(run: Run, model: str, method: str, stage: str, metric: str) -> np.ndarray:
    """One value per seed of ``<model>/<method>/<seed>/<stage>/<metric>`` (``stage``: end, os)."""
    return np.array(
        [
            run.history(f"{model}/{method}/{s}/{stage}/{metric}")[1][-1]
            for s in _seeds(run, model, method)
        ]
    )


def _pm(v: np.ndarray, digits: int = 4) -> str:
    return f"{v.mean():.{digits}g} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2g}"


def table(run: Run) -> str:
    """Markdown: one row per (model, method, before/after OS), mean ± std over seeds."""
    head = "| model | method | OS | " + " | ".join(FINAL) + " |"
    lines = [head, "|" + "---|" * (3 + len(FINAL))]
    for model in _models(run):
        for method in METHODS:
            for stage, label in (("end", "before"), ("os", "after")):
                cells = [_pm(final(run, model, method, stage, m)) for m in FINAL]
                lines.append(
                    f"| {model} | {LABELS[method]} | {label} | " + " | ".join(cells) + " |"
                )
    return "\n".join(lines)


OUTPUT_TOL = 1e-4  # "outputs unchanged": largest relative change of the layer outputs


def verdicts(run: Run) -> list[Verdict]:
    """The OS paper's claims, per model, over seeds (rules of ``_stats``; paired by seed)."""
    out = []
    for model in _models(run):
        out.extend(_model_verdicts(run, model))
    return out


def _model_verdicts(run: Run, model: str) -> list[Verdict]:
    def f(method: str, stage: str, m: str) -> np.ndarray:
        return final(run, model, method, stage, m)

    rel = np.max([f(m, "os", "max_rel_change") for m in METHODS], axis=0)  # (S,) worst method
    rows = [Verdict(f"{model}: post hoc OS keeps the outputs on the batch",
                    effect_verdict(mean_ci(OUTPUT_TOL - rel), +1),
                    f"largest relative change of the layer outputs {mean_ci(rel).format(7)}",
                    f"change < {OUTPUT_TOL:g}")]
    for metric, what in (("v_norm", "|V|_F"), ("trace", "the Hessian trace")):
        est = paired_diff(f("sgd", "os", metric), f("sgd", "end", metric))
        rows.append(Verdict(f"{model}: post hoc OS lowers {what} (SGD model)",
                            effect_verdict(est, -1), f"after - before {est.format(4)}",
                            "difference < 0 (paired by seed)"))
    for other in ("sgd", "wd"):
        for metric, what, sign in (("trace", "a lower Hessian trace", -1),
                                   ("lambda_max", "a lower top eigenvalue", -1),
                                   ("test/acc", "a higher test accuracy", +1)):
            est = paired_diff(f("sos", "end", metric), f(other, "end", metric))
            rows.append(Verdict(f"{model}: SOS during training gives {what} than "
                                f"{LABELS[other]}", effect_verdict(est, sign),
                                f"SOS - {LABELS[other]} {est.format(4)}",
                                f"difference {'<' if sign < 0 else '>'} 0 (paired by seed)"))
    return rows


def _band(ax, run: Run, model: str, method: str, name: str) -> None:
    curves = [run.history(f"{model}/{method}/{s}/{name}") for s in _seeds(run, model, method)]
    curves = [c for c in curves if len(c[0])]
    if not curves:
        return
    n = min(len(c[0]) for c in curves)
    steps, vals = curves[0][0][:n], np.stack([c[1][:n] for c in curves])
    mean, std = vals.mean(0), vals.std(0)
    ax.plot(steps, mean, label=LABELS[method])
    ax.fill_between(steps, mean - std, mean + std, alpha=0.25)


def figure_training(run: Run, path: Path) -> Path:
    """Rows: models; columns: metrics over training; mean ± std bands over seeds."""
    models = _models(run)
    fig, axes = new_figure(len(models), len(CURVES), size=(3.3, 2.6))
    for r, model in enumerate(models):
        for c, name in enumerate(CURVES):
            ax = axes[r, c]
            for method in METHODS:
                _band(ax, run, model, method, name)
            ax.set_title(f"{model}: {name}", fontsize=9)
            ax.set_xlabel("step")
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)


def figure_before_after(run: Run, path: Path) -> Path:
    """Bars: each metric at the end of training, before / after post hoc OS, ± std (seeds)."""
    models = _models(run)
    fig, axes = new_figure(len(models), len(FINAL), size=(2.6, 2.6))
    x = np.arange(len(METHODS))
    for r, model in enumerate(models):
        for c, metric in enumerate(FINAL):
            ax = axes[r, c]
            for k, (stage, label) in enumerate((("end", "before OS"), ("os", "after OS"))):
                vals = [final(run, model, m, stage, metric) for m in METHODS]
                ax.bar(
                    x + (k - 0.5) * 0.38,
                    [v.mean() for v in vals],
                    0.38,
                    label=label,
                    yerr=[v.std() for v in vals],
                    capsize=2,
                )
            ax.set_xticks(x, [m.upper() for m in METHODS], fontsize=7)
            ax.set_title(f"{model}: {metric}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    return save_figure(fig, path)


def report_optimum_shifting(runs: list[Run], out_dir: Path) -> list[Path]:
    """Per run: ``<name>-training.png``, ``<name>-before-after.png`` and ``<name>-summary.md``
    (table + verdict)."""
    paths: list[Path] = []
    for run in runs:
        if not _models(run):
            raise ValueError(
                f"run {run.name!r} has no finished (model, method, seed) records; "
                "run it first: graddyn run optimum-shifting"
            )
        paths.append(figure_training(run, out_dir / f"{run.name}-training.png"))
        paths.append(figure_before_after(run, out_dir / f"{run.name}-before-after.png"))
        rows = verdicts(run)
        text = [
            "# optimum-shifting: " + run.name,
            "",
            "mean ± std over seeds",
            "",
            table(run),
            "",
            "## Verdict",
            "",
            verdict_markdown(rows, {"seeds": ",".join(map(str, run.config["seeds"]))}),
        ]
        md = out_dir / f"{run.name}-summary.md"
        md.write_text("\n".join(text))
        write_verdicts(out_dir, rows, {"seeds": ",".join(map(str, run.config["seeds"])),
                                       "models": ",".join(_models(run)),
                                       "steps": run.config.get("steps")},
                       f"{run.name}-verdict")
        paths.append(md)
    return paths
