"""Figures and tables of the ``gradient-transfer`` experiment (see ``gradient_transfer.py``).

Every figure says whether it shows the training or the test set; tables give accuracy in %.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from graddyn.experiments._gradient_transfer_studies import LP_INITS
from graddyn.experiments._seeds import SeedRun
from graddyn.experiments._stats import absence_verdict, effect_verdict, mean_ci, paired_diff
from graddyn.experiments._verdicts import Verdict, write_verdicts
from graddyn.train import Run

# transfer targets of the alpha sweep, in plotting order (the experiment imports this)
INITS = ("own-init", "other-seed", "other-scheme", "zero")


def _h(run: Run, name: str) -> np.ndarray:
    return run.history(name)[1]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _save(fig: Figure, out_dir: Path, run: Run, what: str) -> Path:
    path = out_dir / f"{run.dir.name}_{what}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def _report_alpha(run: Run, out_dir: Path) -> list[Path]:
    alphas = _h(run, "alpha")
    fig = Figure(figsize=(10, 7.5))
    axes = fig.subplots(2, 2)
    methods = (*INITS, "own-init+P(g)", "scaled", "scaled+noise")
    for ax, (split, what) in zip(
        axes.flat, [(s, w) for w in ("acc", "loss") for s in ("train", "test")]
    ):
        for m in methods:
            y = _h(run, f"{m}/{split}_{what}") * (100 if what == "acc" else 1)
            ax.plot(
                alphas,
                y,
                marker="o",
                ms=3,
                ls="--" if m.startswith("scaled") else ":" if "P(g)" in m else "-",
                label=m,
            )
        label = f"{'training' if split == 'train' else 'test'}-set"
        ax.set(
            xlabel="alpha",
            ylabel=f"{label} {'accuracy (%)' if what == 'acc' else 'loss'}",
            title=f"{label} {'accuracy' if what == 'acc' else 'cross-entropy'}",
        )
        if what == "loss":
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("theta0 + alpha * g_A, and alpha * thetaT_A (+ matched noise)")
    rows = [
        [f"{a:g}"]
        + [
            f"{_pct(_h(run, f'{m}/train_acc')[i])} / {_pct(_h(run, f'{m}/test_acc')[i])}"
            for m in methods
        ]
        for i, a in enumerate(alphas)
    ]
    lines = ["Accuracy (%), training / test set", ""] + _table(["alpha", *methods], rows)
    paths = [_save(fig, out_dir, run, "alpha_sweep")]
    if "perm-labels-trained/train_acc_pi" in run.metric_names():
        paths.append(_save(_label_perm_figure(run, alphas), out_dir, run, "label_perm"))
        lines += _label_perm_lines(run, alphas)
    md = out_dir / f"{run.dir.name}_alpha_sweep.md"
    md.write_text("\n".join(lines) + "\n")
    return [*paths, md]


def _label_perm_figure(run: Run, alphas: np.ndarray) -> Figure:
    fig = Figure(figsize=(10, 7.5))
    axes = fig.subplots(2, 2, sharey=True)
    for row, split in enumerate(("train", "test")):
        for col, (suffix, against) in enumerate(
            (("_pi", "permuted labels pi(y)"), ("", "true labels y"))
        ):
            ax = axes[row, col]
            for k, init in enumerate(LP_INITS):
                for kind, ls in (("perm-labels", "-"), ("perm-rows", "--")):
                    g = "g_A'" if kind == "perm-labels" else "P_out(g_A)"
                    y = 100 * _h(run, f"{kind}/{init}/{split}_acc{suffix}")
                    ax.plot(
                        alphas,
                        y,
                        ls=ls,
                        marker="o",
                        ms=3,
                        color=f"C{k}",
                        label=f"{init} + alpha * {g}",
                    )
            ref = 100 * _h(run, f"perm-labels-trained/{split}_acc{suffix}")[0]
            ax.axhline(ref, color="k", ls=":", label="thetaT_A' (trained on pi(y))")
            name = "training-set" if split == "train" else "test-set"
            ax.set(
                xlabel="alpha",
                ylabel=f"{name} accuracy (%)",
                title=f"{name} accuracy against {against}",
            )
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(
        "label permutation: solid theta0 + alpha * g_A' (A' trained on pi(y) from theta0_A), "
        "dashed theta0 + alpha * P_out(g_A)"
    )
    return fig


def _label_perm_lines(run: Run, alphas: np.ndarray) -> list[str]:
    cols = [(k, i) for k in ("perm-labels", "perm-rows") for i in LP_INITS]
    header = ["alpha"] + [
        f"{i} + alpha * {'g_Ap' if k == 'perm-labels' else 'P_out(g_A)'}" for k, i in cols
    ]
    n_cls = sum(n.startswith("label_perm/pi_") for n in run.metric_names())
    pi = [int(_h(run, f"label_perm/pi_{c}")[0]) for c in range(n_cls)]
    out = [
        "",
        f"Label permutation: A' trained from theta0_A on pi(y), pi = {pi} (a derangement); "
        "g_Ap = thetaT_A' - theta0_A; P_out(g_A) = g_A with its output units permuted by pi.",
    ]
    ref = "perm-labels-trained"
    for split, name in (("train", "training set"), ("test", "test set")):
        out += [
            "",
            f"Accuracy (%) on the {name}, against permuted labels pi(y) / against true labels y "
            f"(thetaT_A' itself: {_pct(_h(run, f'{ref}/{split}_acc_pi')[0])} / "
            f"{_pct(_h(run, f'{ref}/{split}_acc')[0])})",
            "",
        ]
        rows = [
            [f"{a:g}"]
            + [
                f"{_pct(_h(run, f'{k}/{i}/{split}_acc_pi')[j])} / "
                f"{_pct(_h(run, f'{k}/{i}/{split}_acc')[j])}"
                for k, i in cols
            ]
            for j, a in enumerate(alphas)
        ]
        out += _table(header, rows)
    return out


def _report_fusion(run: Run, out_dir: Path) -> list[Path]:
    alphas, ts = _h(run, "alpha"), _h(run, "t")
    fig = Figure(figsize=(10, 4))
    for ax, task in zip(fig.subplots(1, 2), ("A", "B")):
        for v in ("raw", "aligned"):
            ax.plot(alphas, 100 * _h(run, f"fuse-{v}/{task}/test_acc"), marker="o", label=v)
        ax.set(
            xlabel="alpha",
            ylabel="test-set accuracy (%)",
            title=f"task {task}, test set: theta_B + alpha * theta_A",
        )
        ax.legend()
    paths = [_save(fig, out_dir, run, "fusion")]
    fig = Figure(figsize=(10, 7.5))
    axes = fig.subplots(2, 2)
    for v in ("raw", "aligned"):
        for split, ls in (("train", "-"), ("test", "--")):
            lab = f"{v}, {'training' if split == 'train' else 'test'} set"
            axes[0, 0].plot(ts, _h(run, f"lmc-{v}/{split}_loss"), ls=ls, label=lab)
            axes[0, 1].plot(ts, 100 * _h(run, f"lmc-{v}/{split}_acc"), ls=ls, label=lab)
        for task, ls in (("A", "-"), ("B", "--")):
            axes[1, 0].plot(
                ts, _h(run, f"interp-{v}/{task}/test_loss"), ls=ls, label=f"{v}, task {task}"
            )
            axes[1, 1].plot(
                ts, 100 * _h(run, f"interp-{v}/{task}/test_acc"), ls=ls, label=f"{v}, task {task}"
            )
    titles = [
        "two seeds, same data: loss",
        "two seeds, same data: accuracy (%)",
        "theta_B -> theta_A: test-set loss",
        "theta_B -> theta_A: test-set accuracy (%)",
    ]
    for ax, title in zip(axes.flat, titles):
        ax.set(xlabel="t  ((1 - t) start + t end)", title=title)
        ax.legend(fontsize=7)
    paths.append(_save(fig, out_dir, run, "paths"))
    rows = [
        [
            p,
            f"{_h(run, f'{p}/train_loss_barrier')[0]:.3f}",
            f"{_h(run, f'{p}/test_loss_barrier')[0]:.3f}",
            _pct(_h(run, f"{p}/test_acc_barrier")[0]),
        ]
        for p in ("lmc-raw", "lmc-aligned", "interp-raw", "interp-aligned")
    ]
    lines = _table(
        [
            "path",
            "training-set loss barrier",
            "test-set loss barrier",
            "test-set accuracy barrier (%)",
        ],
        rows,
    ) + ["", "Fusion, test-set accuracy (%)", ""]
    cols = [f"fuse-{v}/{t}/test_acc" for v in ("raw", "aligned") for t in ("A", "B")]
    lines += _table(
        ["alpha", "raw: task A", "raw: task B", "aligned: task A", "aligned: task B"],
        [[f"{a:g}"] + [_pct(_h(run, c)[i]) for c in cols] for i, a in enumerate(alphas)],
    )
    md = out_dir / f"{run.dir.name}_fusion.md"
    md.write_text("\n".join(lines) + "\n")
    return [*paths, md]


def _report_forgetting(run: Run, out_dir: Path) -> list[Path]:
    alphas = _h(run, "alpha")
    names = run.metric_names()
    refs = sorted(
        {n.split("/")[0] for n in names if n.endswith("/A/test_acc")}
        - {"transfer", "fuse-raw", "fuse-aligned"}
    )
    fig = Figure(figsize=(10, 4))
    for ax, task in zip(fig.subplots(1, 2), ("A", "B")):
        for m in ("transfer", "fuse-raw", "fuse-aligned"):
            ax.plot(alphas, 100 * _h(run, f"{m}/{task}/test_acc"), marker="o", label=m)
        for k, m in enumerate(refs):
            ax.axhline(100 * _h(run, f"{m}/{task}/test_acc")[0], ls=":", color=f"C{k + 3}", label=m)
        ax.set(
            xlabel="alpha",
            ylabel="test-set accuracy (%)",
            title=f"task {task} after A -> B (test set)",
        )
    fig.axes[0].legend(fontsize=7)
    task_acc = f"{refs[0]}/A/test_task_acc" in names
    suffixes = ["test_acc", "test_task_acc"] if task_acc else ["test_acc"]

    def row(label: str, m: str, i: int) -> list[str]:
        return [label] + [_pct(_h(run, f"{m}/{t}/{s}")[i]) for s in suffixes for t in "AB"]

    rows = [row(m, m, 0) for m in refs] + [
        row(f"{m} alpha={a:g}", m, i)
        for m in ("transfer", "fuse-raw", "fuse-aligned")
        for i, a in enumerate(alphas)
    ]
    header = ["method", "task A", "task B"] + (
        ["task A (task head)", "task B (task head)"] if task_acc else []
    )
    lines = ["Test-set accuracy (%) after A -> B", ""] + _table(header, rows)
    md = out_dir / f"{run.dir.name}_forgetting.md"
    md.write_text("\n".join(lines) + "\n")
    return [_save(fig, out_dir, run, "forgetting"), md]


# ---- verdicts over seeds ----------------------------------------------------------------
SAME_MARGIN = 0.02  # "reaches the trained network": within 2 points of test accuracy
NONINF_MARGIN = 0.01  # "does at least as well": not worse by 1 point or more


def _at(h: Callable[[str], np.ndarray], name: str, alphas: np.ndarray, alpha: float) -> float:
    return float(h(name)[int(np.argmin(np.abs(alphas - alpha)))])


def alpha_values(view: Any) -> dict[str, float]:
    """One seed's numbers behind the alpha-sweep verdicts (test accuracy, fractions)."""
    alphas = _h(view, "alpha")
    h = lambda n: _h(view, n)  # noqa: E731
    big = alphas > 1
    out = {"trained": _at(h, "own-init/test_acc", alphas, 1.0),
           "other@1": _at(h, "other-seed/test_acc", alphas, 1.0),
           "other@best>1": float(h("other-seed/test_acc")[big].max()) if big.any() else np.nan,
           "transfer@max": float(h("other-seed/test_acc")[-1]),
           "noise@max": float(h("scaled+noise/test_acc")[-1])}
    if "perm-labels/other-seed/test_acc_pi" in view.metric_names():
        out["perm@1 pi"] = _at(h, "perm-labels/other-seed/test_acc_pi", alphas, 1.0)
        out["perm@1 y"] = _at(h, "perm-labels/other-seed/test_acc", alphas, 1.0)
    return out


def fusion_values(view: Any) -> dict[str, float]:
    return {f"lmc-{v}": float(_h(view, f"lmc-{v}/train_loss_barrier")[0])
            for v in ("raw", "aligned")}


def forgetting_values(view: Any) -> dict[str, float]:
    names = view.metric_names()
    ewc = sorted((float(n.split("/")[0][4:]), n.split("/")[0]) for n in names
                 if n.startswith("ewc-") and n.endswith("/A/test_acc"))
    both = lambda m, i=0: (_h(view, f"{m}/A/test_acc")[i] + _h(view, f"{m}/B/test_acc")[i]) / 2  # noqa: E731
    alphas = _h(view, "alpha")
    return {"fine-tune A": float(_h(view, "fine-tune/A/test_acc")[0]),
            "ewc A": float(_h(view, f"{ewc[-1][1]}/A/test_acc")[0]) if ewc else np.nan,
            "fine-tune both": float(both("fine-tune")),
            "transfer best both": float(max(both("transfer", i) for i in range(len(alphas))))}


def _per_seed(run: Run, fn: Callable[[Any], dict[str, float]]) -> dict[str, np.ndarray]:
    rows = [fn(SeedRun(run, s)) for s in run.config["seeds"]]
    return {k: np.array([r.get(k, np.nan) for r in rows], float) for k in rows[0]}


def verdicts(study: str, v: dict[str, np.ndarray]) -> list[Verdict]:
    """The paper's and its reviewers' claims for ``study`` from per-seed values ``v``."""
    if study == "alpha-sweep":
        gain = paired_diff(v["other@best>1"], v["other@1"])
        gap = paired_diff(v["other@best>1"], v["trained"])
        noise = paired_diff(v["noise@max"], v["transfer@max"])
        rows = [
            Verdict("theta0_B + alpha g_A (another seed's init) improves with alpha > 1",
                    effect_verdict(gain, +1), f"test acc, best alpha > 1 - alpha = 1: {gain}",
                    "difference > 0 (paired by seed)"),
            Verdict("transfer onto another seed's init reaches the trained network",
                    absence_verdict(gap, SAME_MARGIN), f"best alpha > 1 - trained: {gap}",
                    f"|difference| < {SAME_MARGIN} (absence)"),
            Verdict("at the largest alpha, a rescaled trained net plus matched noise does at "
                    "least as well as transfer", effect_verdict(
                        mean_ci(v["noise@max"] - v["transfer@max"] + NONINF_MARGIN), +1),
                    f"test acc, noise baseline - transfer: {noise}",
                    f"difference > -{NONINF_MARGIN}")]
        if "perm@1 pi" in v:
            perm = paired_diff(v["perm@1 pi"], v["perm@1 y"])
            rows.append(Verdict("g_A' of a run on permuted labels pi(y) transfers pi, not y",
                                effect_verdict(perm, +1), "other-seed init, alpha = 1, test "
                                f"acc against pi(y) - against y: {perm}", "difference > 0"))
        return rows
    if study == "fusion":
        est = paired_diff(v["lmc-raw"], v["lmc-aligned"])
        return [Verdict("permutation alignment lowers the loss barrier between two seeds",
                        effect_verdict(est, +1), f"training-set loss barrier raw "
                        f"{mean_ci(v['lmc-raw'])}, aligned {mean_ci(v['lmc-aligned'])}; "
                        f"difference {est}", "raw - aligned > 0 (paired by seed)")]
    ewc = paired_diff(v["ewc A"], v["fine-tune A"])
    tr = paired_diff(v["transfer best both"], v["fine-tune both"])
    return [Verdict("EWC (largest lambda) keeps task A better than fine-tuning",
                    effect_verdict(ewc, +1), f"task A test acc, EWC - fine-tune: {ewc}",
                    "difference > 0 (paired by seed)"),
            Verdict("transfer thetaT_A + alpha g_B (best alpha) forgets less than fine-tuning",
                    effect_verdict(tr, +1), f"mean of task A and B test acc, transfer - "
                    f"fine-tune: {tr}", "difference > 0 (paired; alpha picked on test: "
                    "optimistic)")]


def report_gradient_transfer(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """For each run: the study's figures (PNG) and a markdown table of accuracies (%) of its
    first seed, and ``<run>_verdict.md`` / ``.json`` over all its seeds."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for run in runs:
        study = run.config["study"]
        draw, values = {"alpha-sweep": (_report_alpha, alpha_values),
                        "fusion": (_report_fusion, fusion_values),
                        "forgetting": (_report_forgetting, forgetting_values)}[study]
        seeds = run.config.get("seeds") or []
        if not seeds or "alpha" not in SeedRun(run, seeds[0]).metric_names():
            raise ValueError(f"run {run.name!r} has no gradient-transfer results; run it "
                             "first (graddyn run gradient-transfer)")
        paths += draw(SeedRun(run, seeds[0]), out_dir)
        write_verdicts(out_dir, verdicts(study, _per_seed(run, values)), {
            "seeds": ",".join(map(str, seeds)), "study": study, "tasks": run.config["tasks"],
            "dataset": run.config["dataset"], "figures and tables": f"seed {seeds[0]}"},
            f"{run.dir.name}_verdict")
    return paths
