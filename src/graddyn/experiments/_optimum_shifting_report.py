"""Figures, the mean +- std table and the generated verdict of ``optimum-shifting``.

Reads only the run store: ``<model>/<method>/s<seed>/{end,os}/<metric>`` (before / after post
hoc OS), ``.../curv/<metric>`` and ``.../{train,test}/<metric>`` over training, and
``<model>/tune/...`` for the weight-decay grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

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


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the paired differences ``a - b`` over seeds."""
    d = a - b
    se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("inf")
    return float(d.mean()), float(se)


def _call(mean: float, se: float, lower_is_better: bool = False) -> str:
    """Significant at ~2 standard errors of the paired difference, or not."""
    sign = -1 if lower_is_better else 1
    if sign * mean - 2 * se > 0:
        return "better"
    if sign * mean + 2 * se < 0:
        return "worse"
    return "no significant difference"


def verdicts(run: Run) -> list[str]:
    """The OS paper's claims, checked per model with the numbers behind each call."""
    out = []
    for model in _models(run):
        wd = run.history(f"{model}/tune/best_wd")[1]
        title = f"### {model}" + (f" (tuned weight decay: {wd[-1]:g})" if len(wd) else "")
        out.extend(["", title])
        out.extend(_model_verdicts(run, model))
    return out


def _model_verdicts(run: Run, model: str) -> list[str]:
    def f(method: str, stage: str, m: str) -> np.ndarray:
        return final(run, model, method, stage, m)

    rel = max(f(m, "os", "max_rel_change").max() for m in METHODS)
    dloss = np.concatenate(
        [np.abs(f(m, "os", "train/loss") - f(m, "end", "train/loss")) for m in METHODS]
    )
    rank = np.concatenate([f(m, "os", "rank") for m in METHODS])
    rows = f("sgd", "os", "rows")[0]
    dv = _paired(f("sgd", "os", "v_norm"), f("sgd", "end", "v_norm"))
    dtr = _paired(f("sgd", "os", "trace"), f("sgd", "end", "trace"))
    se_tr = f("sgd", "end", "trace_se").mean()
    lines = [
        f"- **Outputs unchanged by post hoc OS**: max relative change of the layer outputs on "
        f"the OS batch {rel:.1e}; |Δ training loss| on the whole training split "
        f"{dloss.max():.1e} — {'yes' if rel < 1e-4 else 'NO'}. Rank of the {rows:g} feature "
        f"rows: {rank.min():g}-{rank.max():g}"
        + (" (full column rank: OS is the identity, nothing to shift)" if dv[0] == 0 else "")
        + ".",
        f"- **|V|_F down (post hoc, SGD model)**: Δ = {dv[0]:.3g} ± {dv[1]:.2g} (SE); "
        f"**Hessian trace** Δ = {dtr[0]:.3g} ± {dtr[1]:.2g} "
        + ("(exact traces: the spread is over seeds only)." if se_tr == 0 else
           f"(Hutchinson SE per estimate ~{se_tr:.2g})."),
    ]
    for other in ("sgd", "wd"):
        lines.append(_sos_line(f, other))
    return lines


def _sos_line(f, other: str) -> str:
    parts = []
    for metric, lower in (
        ("test/acc", False),
        ("v_norm", True),
        ("trace", True),
        ("lambda_max", True),
    ):
        m, se = _paired(f("sos", "end", metric), f(other, "end", metric))
        parts.append(f"{metric} Δ = {m:+.3g} ± {se:.2g} ({_call(m, se, lower)})")
    return f"- **SOS vs {LABELS[other]}** (paired over seeds, ± SE): " + "; ".join(parts) + "."


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
        text = [
            "# optimum-shifting: " + run.name,
            "",
            "mean ± std over seeds",
            "",
            table(run),
            "",
            "## Verdict",
            "",
            *verdicts(run),
            "",
        ]
        md = out_dir / f"{run.name}-summary.md"
        md.write_text("\n".join(text))
        paths.append(md)
    return paths
