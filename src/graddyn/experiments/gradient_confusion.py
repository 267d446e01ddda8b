"""Experiment ``gradient-confusion``: width, depth, batch norm, skip connections, init.

Reproduces Sankararaman, De, Xu, Huang & Goldstein, "The impact of neural network
overparameterization on gradient confusion and stochastic gradient descent" (ICML 2020): at
standard initializations wider networks have lower gradient confusion and train faster, deeper
ones higher confusion; batch norm with skip connections (or, for deep linear nets, orthogonal
initialization) removes the growth with depth. Sub-studies (``study``):

* ``width``: MLPs (or WRNs, ``arch=wide-resnet``: ``widths`` are width factors) of depth
  ``depth`` for each of ``widths``;
* ``depth``: width ``width`` for each of ``depths``;
* ``bn-skip``: wide-ResNet-style CNNs at each of ``wrn_depths``, the four combinations of batch
  norm and skip connections (``plain``, ``skip``, ``bn``, ``bn+skip``);
* ``init``: deep linear MLPs of width ``width`` at each of ``linear_depths`` for each of
  ``inits`` (Gaussian ``N(0, gain^2 / fan_in)`` vs orthogonal, both with ``linear_gain``).

Every (group, factor, seed) cell is trained with plain SGD on its own ``Trainer`` (tag
``group/factor=value/seed=s``) and, every ``measure_every`` epochs and at init, measured in
two forms (see ``_confusion_study``): per-example (engine Gram on ``probe_size`` fixed training
examples, eval-mode batch norm) and minibatch (all pairs of ``mb_count`` minibatch gradients of
``mb_size``, training-mode batch norm). The report plots confusion and training speed against
the factor (seeds as error bars) and writes ``{study}_claims.md``: claim, numbers, verdict.

    graddyn run gradient-confusion --set study=depth            # ~1-3 minutes on 2 cores
    graddyn report gradient-confusion__study=depth

The paper's settings on a local CIFAR-10 (SGD without momentum, batch 128, step decay)::

    graddyn run gradient-confusion --set study=bn-skip --set dataset=cifar10 --set epochs=200 \
        --set lr=0.1 --set lr_milestones=100,150 --set wrn_depths=16,28,40 --set wrn_width=2 \
        --set base_channels=16 --set mb_count=15 --set probe_size=128
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from graddyn.data import DataSplits, subsample
from graddyn.experiments._base import register_experiment
from graddyn.experiments._config import ConfigError, check_min, config_from_dict
from graddyn.experiments._confusion_study import (
    ABSENCE_SLOPE,
    MinibatchConfusion,
    Table,
    cell_summary,
    eval_mode_backward,
    paper_claims,
)
from graddyn.experiments._seeds import load_study_data
from graddyn.experiments._stats import RULE, mean_ci
from graddyn.instruments.confusion import Confusion
from graddyn.models import build_model, init_weights
from graddyn.train import (
    NonFiniteLossError,
    Probes,
    Recording,
    Run,
    Trainer,
    at_end,
    every,
    new_figure,
    seed_all,
)
from graddyn.train import save_figure as _save

__all__ = ["Cell", "GradientConfusionConfig", "make_cells", "make_model",
           "report_gradient_confusion", "run_gradient_confusion", "study_table"]

STUDIES = ("width", "depth", "bn-skip", "init")
STUDY_EPOCHS = {"width": 8, "depth": 8, "bn-skip": 4, "init": 8}
STUDY_LR = {"width": 0.1, "depth": 0.1, "bn-skip": 0.1, "init": 0.02}
BN_SKIP = {"plain": (False, False), "skip": (False, True), "bn": (True, False),
           "bn+skip": (True, True)}  # group -> (batchnorm, skip)


@dataclass(frozen=True)
class GradientConfusionConfig:
    """Defaults: each sub-study in about 1-3 minutes on 2 cores on ``digits``."""

    study: Literal["width", "depth", "bn-skip", "init"] = "width"
    dataset: str = "digits"
    preprocess: Literal["scale", "standardize"] = "standardize"  # as before this option
    arch: Literal["mlp", "wide-resnet"] = "mlp"  # width / depth studies
    widths: tuple[int, ...] = (8, 32, 128, 512)  # width study (WRN: width factors)
    depth: int = 4  # width study (MLP hidden layers; WRN: 6n+4)
    depths: tuple[int, ...] = (1, 2, 4, 8, 16)  # depth study
    width: int = 64  # depth and init studies (WRN: width factor)
    batchnorm: bool = False  # WRN in width / depth studies: isolate the factor
    skip: bool = False
    wrn_depths: tuple[int, ...] = (10, 16, 22)  # bn-skip study (6n+4)
    wrn_width: int = 1  # bn-skip width factor
    base_channels: int = 4  # WRN channels (1, 2, 4) * base * factor
    linear_depths: tuple[int, ...] = (2, 4, 8, 16, 32)  # init study (hidden layers)
    inits: tuple[str, ...] = ("gaussian", "orthogonal")  # init study
    linear_gain: float = 1.0  # init study: variance preserving for a linear net
    init: str = "gaussian"  # other studies: MSRA N(0, 2 / fan_in) (the paper's)
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 0  # 0: the study's default, STUDY_EPOCHS (bn-skip's CNNs are slower)
    batch_size: int = 128
    lr: float = 0.0  # 0: the study's default, STUDY_LR (deep linear nets diverge at 0.1)
    momentum: float = 0.0  # the paper: SGD without momentum
    weight_decay: float = 0.0
    lr_milestones: tuple[int, ...] = ()  # epochs where lr *= lr_gamma (step decay)
    lr_gamma: float = 0.1
    measure_every: int = 1  # epochs between confusion measurements (and at init)
    evals_per_epoch: int = 2  # full train/test evaluations per epoch (training speed)
    probe_size: int = 64  # per-example form: B(B-1)/2 pairs
    mb_count: int = 10  # minibatch form: count(count-1)/2 pairs
    mb_size: int = 128
    target_acc: float = 0.9  # training speed: first step with train accuracy >= this
    target_loss: float = 0.3
    max_train: int = 0  # 0: the whole training set
    seed: int = 0  # seeds the data subsample; models use ``seeds``

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "wrn_depths", "linear_depths", "seeds",
                     "lr_milestones", "inits"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.study not in STUDIES:
            raise ValueError(f"unknown study {self.study!r}; valid: {', '.join(STUDIES)}")
        if self.arch not in ("mlp", "wide-resnet"):
            raise ValueError(f"unknown arch {self.arch!r}; valid: mlp, wide-resnet")
        if self.epochs < 0 or self.lr < 0:
            raise ValueError("epochs and lr must be > 0 (or 0: the study's default), got "
                             f"{self.epochs}, {self.lr}")
        check_min(self, "batch_size measure_every evals_per_epoch "
                  "mb_size wrn_width base_channels width")
        if self.probe_size < 2 or self.mb_count < 2:
            raise ValueError("probe_size and mb_count must be >= 2 (confusion needs pairs), "
                             f"got {self.probe_size}, {self.mb_count}")
        if not self.seeds:
            raise ValueError("seeds must be non-empty, e.g. seeds=0,1,2")
        self._check_factors()

    def _check_factors(self) -> None:
        lists = {"width": ("widths", 1), "depth": ("depths", 0), "init": ("linear_depths", 0)}
        name, low = lists.get(self.study, ("wrn_depths", 10))
        if not getattr(self, name) or min(getattr(self, name)) < low:
            raise ValueError(f"{name} must be non-empty values >= {low} for study "
                             f"{self.study!r}, got {getattr(self, name)}")
        wrn = {"bn-skip": self.wrn_depths, "width": (self.depth,), "depth": self.depths}
        if self.study == "bn-skip" or self.arch == "wide-resnet":
            bad = [d for d in wrn.get(self.study, ()) if d < 10 or (d - 4) % 6]
            if bad:
                raise ValueError(f"wide-resnet depths must be 6n+4 (10, 16, 22, ...), got "
                                 f"{bad}; set depth / depths / wrn_depths accordingly")


@dataclass(frozen=True)
class Cell:
    """One trained network: ``group`` (a line in the plots), ``factor`` (its x value), seed."""

    group: str
    factor: int
    seed: int
    arch: str
    init: str
    gain: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    factor_name: str = "depth"

    @property
    def tag(self) -> str:
        return f"{self.group}/{self.factor_name}={self.factor}/seed={self.seed}"


def _wrn(cfg: GradientConfusionConfig, depth: int, factor: int, bn: bool, skip: bool) -> dict:
    return {"depth": depth, "width_factor": factor, "base_channels": cfg.base_channels,
            "batchnorm": bn, "skip": skip}


def make_cells(cfg: GradientConfusionConfig) -> list[Cell]:
    """Every (group, factor, seed) cell of the study, in training order."""
    if cfg.study == "bn-skip":
        return [Cell(g, d, s, "wide-resnet", cfg.init, None, _wrn(cfg, d, cfg.wrn_width, *bs))
                for g, bs in BN_SKIP.items() for d in cfg.wrn_depths for s in cfg.seeds]
    if cfg.study == "init":
        return [Cell(i, d, s, "linear-mlp", i, cfg.linear_gain, {"width": cfg.width, "depth": d})
                for i in cfg.inits for d in cfg.linear_depths for s in cfg.seeds]
    mlp = cfg.arch == "mlp"
    if cfg.study == "width":
        opts = [({"width": w, "depth": cfg.depth} if mlp else
                 _wrn(cfg, cfg.depth, w, cfg.batchnorm, cfg.skip)) for w in cfg.widths]
        pairs = list(zip(cfg.widths, opts))
    else:
        opts = [({"width": cfg.width, "depth": d} if mlp else
                 _wrn(cfg, d, cfg.width, cfg.batchnorm, cfg.skip)) for d in cfg.depths]
        pairs = list(zip(cfg.depths, opts))
    return [Cell(cfg.arch, f, s, cfg.arch, cfg.init, None, o, cfg.study)
            for f, o in pairs for s in cfg.seeds]


def make_model(cell: Cell, data: DataSplits) -> nn.Module:
    """The cell's network in the default dtype, seeded by ``cell.seed``, initialised by
    ``cell.init`` (``cell.gain`` overrides the scheme's gain)."""
    seed_all(cell.seed)
    model = build_model(cell.arch, data.input_shape, data.num_classes, **cell.options)
    return init_weights(model, cell.init, cell.gain)


def load_data(cfg: GradientConfusionConfig) -> DataSplits:
    """The dataset in the default dtype; ``max_train`` examples (seeded subsample) if set."""
    d = load_study_data(cfg.dataset, "", cfg.preprocess)
    d = subsample(d, min(cfg.max_train, len(d.train_y)) or None,  # more than N: all N
                  generator=torch.Generator().manual_seed(cfg.seed))
    dtype = torch.get_default_dtype()
    d = replace(d, train_x=d.train_x.to(dtype), test_x=d.test_x.to(dtype))
    if len(d.train_y) < max(cfg.batch_size, cfg.mb_size):
        raise ConfigError(f"{len(d.train_y)} training examples is fewer than batch_size="
                         f"{cfg.batch_size} / mb_size={cfg.mb_size}; lower them or max_train")
    return d


def _train_cell(cfg: GradientConfusionConfig, cell: Cell, data: DataSplits, run: Run) -> None:
    """Train one cell with SGD, measuring both confusion forms on the epoch schedule."""
    model = make_model(cell, data)
    per_epoch = len(data.train_y) // cfg.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr or STUDY_LR[cfg.study],
                          momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, [m * per_epoch for m in cfg.lr_milestones], cfg.lr_gamma)
    measure = every(per_epoch * cfg.measure_every) | at_end
    mb = MinibatchConfusion(data.train_x, data.train_y, cfg.mb_count, cfg.mb_size, cell.seed)
    trainer = Trainer(
        model, opt, data, batch_size=cfg.batch_size, seed=cell.seed, run=run, tag=cell.tag,
        probes=Probes([(Confusion(), measure), (mb, measure)], size=cfg.probe_size,
                      backward=eval_mode_backward),
        lr_scheduler=sched,
        # evaluating at every measurement too gives the train loss there (matched comparison)
        recording=Recording(loss=None,
                            eval=every(max(1, per_epoch // cfg.evals_per_epoch)) | measure),
    )
    try:
        trainer.fit((cfg.epochs or STUDY_EPOCHS[cfg.study]) * per_epoch)
    except NonFiniteLossError:  # a diverged cell is a result (never reaches the target)
        step = trainer.state.step if trainer.state is not None else 0
        run.log(step, {f"{cell.tag}/diverged": 1.0})


def run_gradient_confusion(cfg: GradientConfusionConfig, run: Run) -> None:
    """Train and measure every cell; a resumed run skips the cells that finished."""
    data = load_data(cfg)
    for cell in make_cells(cfg):
        _train_cell(cfg, cell, data, run)


# ---- report ------------------------------------------------------------------------------
def study_table(cfg: GradientConfusionConfig, runs: list[Run]) -> Table:
    """group -> factor -> summaries (one per seed) of every run of ``cfg.study``."""
    table: Table = {}
    for run in runs:
        rcfg = config_from_dict(GradientConfusionConfig, run.config)
        if rcfg.study != cfg.study:
            continue
        for cell in make_cells(rcfg):
            summary = cell_summary(run, cell.tag, cfg.target_acc, cfg.target_loss)
            table.setdefault(cell.group, {}).setdefault(cell.factor, []).append(summary)
    return table


def _errorbar(ax: Any, table: Table, key: str, cap: float, **kw: Any) -> None:
    for i, (group, by_factor) in enumerate(table.items()):
        xs = sorted(by_factor)
        vals = [np.minimum([s[key] for s in by_factor[x]], cap) for x in xs]
        vals = [v[~np.isnan(v)] for v in vals]  # nan: a diverged cell after init
        keep = [i for i, v in enumerate(vals) if len(v)]
        xs, vals = [xs[i] for i in keep], [vals[i] for i in keep]
        half = [mean_ci(v).half_width if len(v) > 1 else 0.0 for v in vals]
        ax.errorbar(xs, [v.mean() for v in vals], half, capsize=3,
                    marker="o", label=f"{group} {kw.get('suffix', '')}".strip(),
                    linestyle=kw.get("ls", "-"), color=f"C{i}")


def _factor_plot(study: str, table: Table, total: int, out: Path) -> Path:
    """Confusion (min cosine, eta; both forms; init dashed) and speed against the factor."""
    fig, axes = new_figure(2, 3, size=(3.6, 2.8))
    name = "width" if study == "width" else "depth"
    for col, (form, label) in enumerate((("pe", "per-example"), ("mb", "minibatch"))):
        for row, stat in enumerate(("min_cosine", "eta")):
            ax = axes[row, col]
            _errorbar(ax, table, f"{form}_{stat}_avg", np.inf, suffix="(avg)")
            _errorbar(ax, table, f"{form}_{stat}_init", np.inf, suffix="(init)", ls="--")
            ax.set_title(f"{label}: {stat.replace('_', ' ')}", fontsize=9)
    _errorbar(axes[0, 2], table, "steps_to_acc", 2.0 * total)
    axes[0, 2].axhline(total, color="grey", lw=0.5)
    axes[0, 2].set_title("steps to target train acc (line: budget)", fontsize=9)
    _errorbar(axes[1, 2], table, "final_train_loss", 5.0)
    axes[1, 2].set_title("final train loss (diverged: 5)", fontsize=9)
    factors = sorted({f for by_f in table.values() for f in by_f})
    for ax in axes.flat:
        ax.set_xlabel(name)
        if factors[0] > 0 and factors[-1] >= 4 * factors[0]:  # geometric grids: log axis
            ax.set_xscale("log", base=2)
        ax.set_xticks(factors, [str(f) for f in factors])
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"gradient confusion vs {name} (mean ± 95 % t-interval over seeds)")
    return _save(fig, out / f"{study}_vs_factor.png")


def _over_training(cfg: GradientConfusionConfig, run: Run, out: Path) -> Path:
    """Min cosine over training, one line per cell of the run's first seed."""
    fig, axes = new_figure(1, 2, size=(4.5, 3.2))
    cells = [c for c in make_cells(cfg) if c.seed == cfg.seeds[0]]
    for ax, (inst, label) in zip(axes[0], (("confusion", "per-example"),
                                           ("mb_confusion", "minibatch"))):
        for c in cells:
            steps, vals = run.history(f"{c.tag}/{inst}/min_cosine")
            ax.plot(steps, vals, label=f"{c.group} {c.factor_name}={c.factor}", lw=1)
        ax.set_title(f"{label}: min cosine (seed {cfg.seeds[0]})", fontsize=9)
        ax.set_xlabel("step")
    axes[0, 1].legend(fontsize=5, ncol=2)
    return _save(fig, out / f"{cfg.study}_over_training.png")


def _histograms(cfg: GradientConfusionConfig, run: Run, out: Path) -> Path:
    """Per-example cosine histograms at init and at the end (first seed), one panel a group."""
    groups = list(dict.fromkeys(c.group for c in make_cells(cfg)))
    fig, axes = new_figure(2, len(groups), size=(3.2, 2.6))
    centres = None
    for c in (c for c in make_cells(cfg) if c.seed == cfg.seeds[0]):
        steps, _ = run.history(f"{c.tag}/confusion/min_cosine")
        for row, step in enumerate((steps[0], steps[-1])):
            hist = run.load_array(f"{c.tag}/confusion/cos_hist", step=int(step))
            centres = np.linspace(-1, 1, len(hist) + 1)[:-1] + 1.0 / len(hist)
            ax = axes[row, groups.index(c.group)]
            ax.plot(centres, hist / hist.sum(), label=f"{c.factor_name}={c.factor}")
            ax.set_title(f"{c.group}, {'init' if row == 0 else f'step {step}'}", fontsize=8)
    for ax in axes.flat:
        ax.set_xlabel("cosine of per-example gradients")
    axes[0, 0].legend(fontsize=6)
    return _save(fig, out / f"{cfg.study}_cosine_histograms.png")


def _claims(cfg: GradientConfusionConfig, table: Table, total: int, out: Path) -> Path:
    """``{study}_claims.md`` and the same table as a figure; returns the figure."""
    rows = paper_claims(cfg.study, table, total)
    n = max(len(cells) for by_f in table.values() for cells in by_f.values())
    lines = [f"# gradient confusion, study {cfg.study}: the paper's claims", "",
             "Confusion = minimum pairwise cosine (eta = max(0, -min inner product)) at init "
             "and averaged over the measurements of training and at the first measurement "
             f"with train loss <= {cfg.target_loss} (matched); speed = steps until train "
             f"accuracy >= {cfg.target_acc} (budget {total} steps; never: 2 x budget).", "",
             "**Rule.** " + RULE, "",
             f"**Parameters.** seeds = {','.join(map(str, cfg.seeds))} (n = {n} per cell); a "
             "trend is the per-seed least-squares slope against log2(factor) (change per "
             "doubling); two groups: Welch's interval of the difference; \"does not grow\": "
             f"absence margin ±{ABSENCE_SLOPE} per doubling; dataset = {cfg.dataset}; "
             f"epochs = {cfg.epochs or STUDY_EPOCHS[cfg.study]}.", "",
             "| claim | form | measured (mean ± 95 % interval over seeds) | verdict |",
             "|---|---|---|---|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    (out / f"{cfg.study}_claims.md").write_text("\n".join(lines) + "\n")
    (out / f"{cfg.study}_verdict_grid.md").write_text(claims_grid(rows))
    fig, axes = new_figure(1, 1, size=(10.0, 0.3 * len(rows) + 0.6))
    ax = axes[0, 0]
    ax.axis("off")
    tab = ax.table(cellText=[list(r) for r in rows], colLabels=["claim", "form", "measured",
                                                                 "verdict"], loc="center")
    tab.auto_set_font_size(False)
    tab.set_fontsize(6)
    tab.auto_set_column_width([0, 1, 2, 3])
    return _save(fig, out / f"{cfg.study}_claims.png")


def claims_grid(rows: list[tuple[str, str, str, str]]) -> str:
    """One line per claim, one column per measurement form, each cell the generated verdict
    word: every form is shown, none picked."""
    forms = list(dict.fromkeys(r[1] for r in rows))
    claims = list(dict.fromkeys(r[0] for r in rows))
    cell = {(r[0], r[1]): r[3] for r in rows}
    lines = ["| claim | " + " | ".join(forms) + " |", "|---" * (len(forms) + 1) + "|"]
    lines += [f"| {c} | " + " | ".join(cell.get((c, f), "") for f in forms) + " |"
              for c in claims]
    return "\n".join(lines) + "\n"


def report_gradient_confusion(runs: list[Run], out_dir: Path) -> list[Path]:
    """Per study among ``runs`` (seeds of runs of one study are pooled): confusion and speed vs
    the factor, confusion over training, cosine histograms, and the claims table (PNG + md)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    seen: set[str] = set()
    for run in runs:
        cfg = config_from_dict(GradientConfusionConfig, run.config)
        if cfg.study in seen:
            continue
        seen.add(cfg.study)
        table = study_table(cfg, runs)
        total = int(run.history(f"{make_cells(cfg)[0].tag}/train/loss")[0].max(initial=0))
        paths += [_factor_plot(cfg.study, table, total, out), _over_training(cfg, run, out),
                  _histograms(cfg, run, out), _claims(cfg, table, total, out)]
    return paths


register_experiment(
    "gradient-confusion",
    "Gradient confusion vs width, depth, batch norm + skip, init (Sankararaman et al. 2020).",
    GradientConfusionConfig, run_gradient_confusion, report_gradient_confusion,
    demo=GradientConfusionConfig(study="depth", depths=(1, 4, 16), seeds=(0,), epochs=3))
