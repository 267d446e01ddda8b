"""Experiment ``tracin.mislabel``: find mislabelled training examples by TracIn self-influence.

Reproduces the mislabelled-data study of Pruthi, Liu, Kale & Sundararajan, "Estimating
Training Data Influence by Tracing Gradient Descent" (NeurIPS 2020, Sec. 4.1): train with a
fraction of labels flipped (``graddyn.data.flip_labels``, 10 % by default), saving
``n_checkpoints`` checkpoints evenly over training, then rank the training examples by

    self-influence(z) = sum_t eta_t |grad l(w_t, z)|^2

and check them in that order. The figure plots the fraction of flipped labels found against
the fraction of the data checked for self-influence, the final loss (a strong baseline),
random order, and self-influence from 1 (the last), 3 and all checkpoints (evenly spaced).
It also compares the self-influence of pristine and corrupt examples: the coherent-gradients
view (Chatterjee, ICLR 2020) predicts corrupt examples, whose gradients agree with few
others, are fitted late and one by one, so their gradients stay large for longer.

Every seed of ``seeds`` repeats the study (subset, flips, initial weights, order; metrics and
checkpoints under ``seed<s>/``); the report gives each number as mean ± 95 % interval over
seeds and its verdicts by the rules of ``_stats``. Departures from the paper (config values):
digits and an MLP instead of its MNIST / CIFAR-10 models, and only the baselines that need no
second method (final loss, random order).

    graddyn run tracin.mislabel                              # digits, MLP, 3 seeds, ~3 min
    graddyn run tracin.mislabel --set dataset=mnist-subset
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from graddyn._losses import per_example_cross_entropy
from graddyn.data import flip_labels, subsample
from graddyn.experiments._base import register_experiment
from graddyn.experiments._config import ConfigError, check_min, config_from_dict
from graddyn.experiments._seeds import check_seeds, load_study_data
from graddyn.experiments._stats import effect_verdict, mean_ci, paired_diff
from graddyn.experiments._verdicts import Verdict, departures, write_verdicts
from graddyn.influence import TracIn, checkpoints_from_run
from graddyn.models import build_model
from graddyn.train import Recording, Run, Trainer, at, at_end, every, new_figure, save_figure

__all__ = ["TracInMislabelConfig", "checkpoint_subset", "fraction_found",
           "report_tracin_mislabel", "run_tracin_mislabel"]

CHECKED = (0.1, 0.2, 0.3)  # fractions of the data checked that the summary reports


@dataclass(frozen=True)
class TracInMislabelConfig:
    """All knobs; the defaults take about a minute per seed on 2 cores (4,400 SGD steps)."""

    dataset: str = "digits"  # or "mnist-subset", ...
    preprocess: Literal["scale", "standardize"] = "standardize"
    model: Literal["mlp", "cnn"] = "mlp"
    width: int = 128  # mlp: hidden width; cnn: hidden units of the dense layer
    depth: int = 1
    noise: float = 0.1  # fraction of training labels flipped to another class
    epochs: int = 100  # long enough to fit most flipped labels: final loss stops telling
    batch_size: int = 32
    lr: float = 0.1  # plain SGD: TracIn follows the SGD steps
    n_checkpoints: int = 10  # evenly spaced over training, the last at the end
    checkpoint_counts: tuple[int, ...] = (1, 3, 0)  # subsets compared; 0 = all
    max_train: int = 0  # 0: the whole training set
    seeds: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "checkpoint_counts",
                           tuple(int(c) for c in self.checkpoint_counts))
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"unknown model {self.model!r}; valid: ('mlp', 'cnn')")
        if not 0.0 < self.noise < 1.0:
            raise ValueError(f"noise must be in (0, 1) (a fraction of labels), got {self.noise}")
        check_min(self, "width depth epochs batch_size n_checkpoints")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        bad = [c for c in self.checkpoint_counts if not 0 <= c <= self.n_checkpoints]
        if bad or not self.checkpoint_counts:
            raise ValueError(f"checkpoint_counts must be non-empty, each in 0..n_checkpoints="
                             f"{self.n_checkpoints} (0 = all), got {self.checkpoint_counts}")
        check_seeds(self.seeds)


# ---- pure helpers ------------------------------------------------------------------------------
def fraction_found(scores: Tensor, corrupt: Tensor) -> Tensor:
    """Check examples by decreasing score: fraction of corrupt ones found after checking
    1, 2, ..., N examples -> (N,). Ties keep index order (stable sort).

    >>> fraction_found(torch.tensor([0.1, 0.9, 0.5]), torch.tensor([False, True, False])).tolist()
    [1.0, 1.0, 1.0]
    """
    order = torch.sort(scores, descending=True, stable=True).indices
    return corrupt[order].double().cumsum(0) / corrupt.sum().clamp(min=1)


def checkpoint_subset(total: int, count: int) -> list[int]:
    """Indices of ``count`` checkpoints evenly spaced over ``total`` (0 = all), always with
    the last one: ``checkpoint_subset(10, 3) == [0, 4, 9]``; ``count=1`` is the last."""
    if count == 0 or count >= total:
        return list(range(total))
    return sorted({int(i) for i in np.round(np.linspace(total - 1, 0, count))})


def _found_at(curve: np.ndarray, frac: float) -> float:
    return float(curve[max(1, int(round(frac * len(curve)))) - 1])


# ---- run --------------------------------------------------------------------------------------
def _setup(cfg: TracInMislabelConfig, seed: int) -> tuple:
    """-> (data with flipped training labels, corrupt mask (N,), model) of one seed."""
    d = load_study_data(cfg.dataset, "", cfg.preprocess)
    d = subsample(d, min(cfg.max_train, len(d.train_y)) or None,  # more than N: all N
                  generator=torch.Generator().manual_seed(seed + 1))
    noisy, mask = flip_labels(d.train_y, cfg.noise, d.num_classes,
                              torch.Generator().manual_seed(seed + 2))
    torch.manual_seed(seed)
    if cfg.model == "mlp":
        model = build_model("mlp", d.input_shape, d.num_classes, width=cfg.width, depth=cfg.depth)
    else:
        model = build_model("cnn", d.input_shape, d.num_classes, hidden=cfg.width)
    return replace(d, train_y=noisy), mask, model.to(d.train_x.dtype)


def run_tracin_mislabel(cfg: TracInMislabelConfig, run: Run) -> None:
    """Every seed: train with checkpoints, then rank by self-influence; logs arrays and
    summary metrics (``seed<s>/found@10%/<ranking>``, ...) at the final step."""
    for seed in cfg.seeds:
        _run_seed(cfg, run, seed)


def _run_seed(cfg: TracInMislabelConfig, run: Run, seed: int) -> dict[str, float]:
    data, mask, model = _setup(cfg, seed)
    n = len(data.train_y)
    if cfg.batch_size > n:
        raise ConfigError(f"batch_size={cfg.batch_size} exceeds the {n} training examples; "
                         "lower batch_size or raise max_train")
    steps = cfg.epochs * (n // cfg.batch_size)
    if steps < cfg.n_checkpoints:
        raise ConfigError(f"{steps} training steps cannot hold n_checkpoints="
                         f"{cfg.n_checkpoints}; raise epochs or lower n_checkpoints")
    ck_steps = np.unique(np.round(np.linspace(steps / cfg.n_checkpoints, steps,
                                              cfg.n_checkpoints)).astype(int))
    tag = f"seed{seed}"
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=cfg.lr), data,
                      batch_size=cfg.batch_size, seed=seed, run=run, tag=tag,
                      recording=Recording(loss=every(max(1, steps // 50)) | at_end, eval=at_end,
                                          checkpoint=at(ck_steps.tolist()) | at_end))
    trainer.fit(steps)
    ckpts = checkpoints_from_run(run, tag, steps=ck_steps.tolist())
    x, y = data.train_x, data.train_y
    terms = TracIn(model, ckpts).self_influence(x, y, batch_size=512, per_checkpoint=True)
    model.eval()
    with torch.no_grad():
        final_loss = per_example_cross_entropy(model(x), y)
    run.log_array(f"{tag}/self_influence_terms", terms)  # (T, N): eta_t |g_t(z_n)|^2
    run.log_array(f"{tag}/final_loss", final_loss)
    run.log_array(f"{tag}/corrupt_mask", mask)
    summary = summarize(terms, final_loss, mask, cfg.checkpoint_counts, seed)
    run.log(steps, {f"{tag}/{k}": v for k, v in summary.items()})
    return summary


def _rankings(terms: Tensor, final_loss: Tensor, counts: tuple[int, ...], seed: int
              ) -> dict[str, Tensor]:
    """name -> scores (N,), checked from the highest."""
    total = terms.shape[0]
    out = {f"self_influence_{c or 'all'}ck": terms[checkpoint_subset(total, c)].sum(0)
           for c in dict.fromkeys((*counts, 0))}  # "all" always
    out["final_loss"] = final_loss
    out["random"] = torch.rand(terms.shape[1], generator=torch.Generator().manual_seed(seed),
                               dtype=terms.dtype)
    return out


def summarize(terms: Tensor, final_loss: Tensor, mask: Tensor, counts: tuple[int, ...],
              seed: int) -> dict[str, float]:
    """found@<p>%/<ranking> for p in 10, 20, 30 and mean self-influence of each group."""
    out: dict[str, float] = {}
    for name, scores in _rankings(terms, final_loss, counts, seed).items():
        curve = fraction_found(scores, mask).numpy()
        for frac in CHECKED:
            out[f"found@{round(100 * frac)}%/{name}"] = _found_at(curve, frac)
    si = terms.sum(0)
    out["self_influence/mean_pristine"] = float(si[~mask].mean())
    out["self_influence/mean_corrupt"] = float(si[mask].mean())
    out["final_loss/mean_pristine"] = float(final_loss[~mask].mean())
    out["final_loss/mean_corrupt"] = float(final_loss[mask].mean())
    return out


# ---- report -----------------------------------------------------------------------------------
def _draw(run: Run, counts: tuple[int, ...], seed: int) -> Figure:
    tag = f"seed{seed}"
    terms = torch.from_numpy(run.load_array(f"{tag}/self_influence_terms"))
    loss = torch.from_numpy(run.load_array(f"{tag}/final_loss")).to(terms.dtype)
    mask = torch.from_numpy(run.load_array(f"{tag}/corrupt_mask"))
    ranks = _rankings(terms, loss, counts, seed)
    checked = np.arange(1, len(mask) + 1) / len(mask)
    fig, axes = new_figure(1, 3, size=(4.2, 3.4))
    a, b, c = axes[0]
    ideal = np.minimum(1.0, checked * len(mask) / max(int(mask.sum()), 1))
    for ax in (a, b):
        ax.plot(checked, ideal, ":", color="grey", label="ideal")
        ax.set(xlabel="fraction of training data checked", ylabel="fraction of flips found")
    for name, style in (("self_influence_allck", "-"),
                        ("final_loss", "--"), ("random", "-.")):
        a.plot(checked, fraction_found(ranks[name], mask), style, label=name)
    a.set_title("ranking by", fontsize=9)
    for cnt in counts:
        name = f"self_influence_{cnt or 'all'}ck"
        label = "all checkpoints" if cnt == 0 else f"{cnt} checkpoint" + "s" * (cnt > 1)
        b.plot(checked, fraction_found(ranks[name], mask), label=label)
    b.set_title("self-influence vs checkpoints used", fontsize=9)
    si = terms.sum(0).clamp(min=1e-12).log10().numpy()
    bins = np.linspace(si.min(), si.max(), 40)
    c.hist(si[~mask.numpy()], bins=bins, alpha=0.6, density=True, label="pristine")
    c.hist(si[mask.numpy()], bins=bins, alpha=0.6, density=True, label="corrupt (flipped)")
    c.set(xlabel="log10 self-influence", ylabel="density")
    c.set_title("self-influence by group", fontsize=9)
    for ax in (a, b, c):
        ax.legend(fontsize=7)
    fig.suptitle(f"{run.name} (seed {seed})", fontsize=9)
    return fig


def seed_values(run: Run, name: str) -> np.ndarray:
    """(S,) the final value of summary metric ``name`` of every seed of ``run``."""
    return np.array([run.history(f"seed{s}/{name}")[1][-1] for s in run.config["seeds"]],
                    float)


def verdicts(values: dict[str, np.ndarray]) -> list[Verdict]:
    """Pruthi et al.'s claims from per-seed values (``name -> (S,)``, names as ``summarize``'s,
    plus ``log_ratio``: log10 of mean corrupt / mean pristine self-influence)."""
    at10 = {k.split("/", 1)[1]: v for k, v in values.items() if k.startswith("found@10%/")}
    rows = []
    for base in ("random", "final_loss", "self_influence_1ck"):
        if base not in at10:
            continue
        est = paired_diff(at10["self_influence_allck"], at10[base])
        rows.append(Verdict(
            f"self-influence over all checkpoints finds more flipped labels than {base}",
            effect_verdict(est, +1), f"flips found after checking 10 %: all checkpoints "
            f"{mean_ci(at10['self_influence_allck'])}, {base} {mean_ci(at10[base])}; "
            f"difference {est}", "difference > 0 (paired by seed)"))
    est = mean_ci(values["log_ratio"])
    rows.append(Verdict("flipped examples have larger self-influence than pristine ones",
                        effect_verdict(est, +1), f"log10(mean corrupt / mean pristine) {est}",
                        "log ratio > 0"))
    return rows


def _summary_md(run: Run) -> tuple[str, list[Verdict]]:
    names = sorted({k.split("/", 2)[2] for k in run.metric_names()
                    if k.startswith("seed") and "/found@10%/" in k})
    lines = ["| ranking | " + " | ".join(f"found @ {round(100 * f)}% checked" for f in CHECKED)
             + " |", "|---" * (len(CHECKED) + 1) + "|"]
    values: dict[str, np.ndarray] = {}
    for name in names:
        for f in CHECKED:
            values[f"found@{round(100 * f)}%/{name}"] = seed_values(
                run, f"found@{round(100 * f)}%/{name}")
        cells = [str(mean_ci(values[f"found@{round(100 * f)}%/{name}"])) for f in CHECKED]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| group | mean self-influence | mean final loss |", "|---|---|---|"]
    for g in ("pristine", "corrupt"):
        si, fl = (seed_values(run, f"{k}/mean_{g}") for k in ("self_influence", "final_loss"))
        lines.append(f"| {g} | {mean_ci(si).format(4)} | {mean_ci(fl).format(4)} |")
    values["log_ratio"] = np.log10(seed_values(run, "self_influence/mean_corrupt")
                                   / seed_values(run, "self_influence/mean_pristine"))
    return "\n".join(lines) + "\n", verdicts(values)


def report_tracin_mislabel(runs: list[Run], out_dir: Path) -> list[Path]:
    """Per run: ``<name>_mislabel.png`` (first seed), ``<name>_summary.md`` (mean ± 95 %
    interval over seeds) and ``<name>_verdict.md`` / ``.json``."""
    out_dir = Path(out_dir)
    paths = []
    for run in runs:
        seeds = run.config.get("seeds") or []
        if not seeds or f"seed{seeds[0]}/found@10%/final_loss" not in run.metric_names():
            raise ValueError(f"run {run.name!r} has no tracin.mislabel results; run it first "
                             "(graddyn run tracin.mislabel)")
        cfg = config_from_dict(TracInMislabelConfig, run.config)
        fig = _draw(run, cfg.checkpoint_counts, cfg.seeds[0])
        paths.append(save_figure(fig, out_dir / f"{run.name}_mislabel.png"))
        out_dir.mkdir(parents=True, exist_ok=True)
        table, rows = _summary_md(run)
        (out_dir / f"{run.name}_summary.md").write_text(table)
        write_verdicts(out_dir, rows, {
            "seeds": ",".join(map(str, cfg.seeds)), "dataset": cfg.dataset,
            "model": cfg.model, "flipped": cfg.noise, "checkpoints": cfg.n_checkpoints,
            "differs from the study's default config": departures(run.config,
                                                                  TracInMislabelConfig())},
            f"{run.name}_verdict")
    return paths


register_experiment(
    "tracin.mislabel",
    "Rank training examples by TracIn self-influence to find flipped labels (Pruthi 2020).",
    TracInMislabelConfig, run_tracin_mislabel, report_tracin_mislabel)
