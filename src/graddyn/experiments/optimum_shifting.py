"""Experiment ``optimum-shifting``: OS post hoc and stochastic OS during training, with the
Hessian analysis and the tuned-weight-decay baseline the reviewers asked for.

"Optimum Shifting to Stabilize Training and Improve Generalization of Deep Neural Networks"
replaces the last linear layer's weights ``V`` by the minimum-Frobenius-norm ``V* = V A^+ A``
that keeps the layer's outputs on a batch of features ``A`` unchanged, arguing the Hessian
trace is bounded by ``|V|_F^2`` times a data term; stochastic OS (SOS) does it every ``k``
steps on ``n`` examples. For each model and seed this trains, on the same data order:

- ``sgd``: plain SGD with momentum (no weight decay);
- ``wd``: the same with the weight decay picked from ``weight_decays`` by validation accuracy
  (the grid is trained on the first seed with the same step budget; the validation split is
  ``val_fraction`` of the training set, held out of *every* method's training data);
- ``sos``: SGD + ``StochasticOptimumShift`` every ``sos_every`` steps on ``sos_batch`` random
  training examples;

and at the end applies post hoc OS on ``os_rows`` training examples. OS changes nothing when
its batch has at least as many rows as the feature width and the features have full column
rank (then ``A^+ A = I``): ``sos_batch`` must be below the width (CNN: ``cnn_hidden``; ResNet:
``4 * width``), and post hoc OS on a large batch only removes directions the features never
span (dead units, exact collapse); the run logs the rank it used. Measured before/after
OS and every ``eval_every`` steps: training loss / accuracy (on the training split), test
accuracy, ``|V|_F``, Hessian trace of the mean loss on ``curv_rows`` training examples (full
and last layer) and, at the end, the top eigenvalue (Lanczos). The trace is exact
(``graddyn.curvature.exact_trace``: tr H = tr GGN for networks piecewise linear in their
parameters, which the ReLU CNN and the eval-mode ResNet are; ``trace_exact`` = 1 in the
log) unless ``exact=false`` or the net has smooth layers, then Hutchinson with
``trace_probes`` / ``last_probes`` probes and its standard error. Approximations: the
curvature is measured on a fixed batch of ``curv_rows`` examples (not the whole training
set); the top eigenvalue uses ``eigsh`` with ``eig_tol``.

BatchNorm (the ``resnet``): the Hessian is that of the eval-mode network (running statistics),
``HessianOperator(..., eval_mode=True)``, and OS features are collected in eval mode, so OS keeps
the *eval-mode* outputs unchanged; in training mode the batch statistics differ, so SOS does
not exactly preserve the outputs the optimizer sees.

Default (digits, small CNN and ResNet-8 of width 8, 3 seeds, 200 steps, exact traces on 128
examples) takes minutes on a 2-core CPU (10 / 30 Hutchinson probes instead of exact traces
are cheaper); ``--set seeds=0,1`` or ``models=cnn`` (~1/3 of the cost) cut it further.
Real data: ``--set dataset=cifar10`` (read from the local folder; error if missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from graddyn.curvature import (
    HessianOperator,
    NotPiecewiseLinearError,
    exact_trace,
    hutchinson_trace,
    top_eigenvalues,
)
from graddyn.experiments._base import register_experiment
from graddyn.experiments._config import ConfigError, check_min
from graddyn.experiments._seeds import load_study_data
from graddyn.interventions.optimum_shift import (
    StochasticOptimumShift,
    collect_features,
    optimum_shift,
)
from graddyn.models import MODELS, build_model, last_linear
from graddyn.train import Event, OnEvent, Recording, Run, Trainer, every, seed_all

METHODS = ("sgd", "wd", "sos")


@dataclass(frozen=True)
class OptimumShiftingConfig:
    """All defaults in one block; see the module docstring for what each study does."""

    dataset: str = "digits"
    data_root: str = ""  # "" -> graddyn.data's default folder (CIFAR / MNIST)
    preprocess: Literal["scale", "standardize"] = "standardize"
    models: tuple[str, ...] = ("cnn", "resnet")
    width: int = 8  # resnet base width
    cnn_channels: tuple[int, ...] = (32, 64)  # the small MNIST CNN's two conv layers
    cnn_hidden: int = 128  # its hidden linear layer = the feature width OS works in
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 200
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    val_fraction: float = 0.2  # carved from training data, for tuning the weight decay
    weight_decays: tuple[float, ...] = (1e-4, 1e-3, 1e-2)
    sos_every: int = 10  # k
    sos_batch: int = 16  # n; must be below the feature width, else OS is the identity
    os_rows: int = 512  # training examples whose features define post hoc OS
    curv_rows: int = 128  # training examples of the curvature batch
    eig_tol: float = 1e-3  # relative tolerance of the top eigenvalue (eigsh)
    trace_probes: int = 10  # Hutchinson probes, full network (when not exact)
    last_probes: int = 30  # Hutchinson probes, last layer (when not exact)
    exact: bool = True  # exact trace (tr H = tr GGN) where the net is piecewise linear
    eval_every: int = 50  # losses / accuracies over training
    curv_every: int = 100  # curvature over training (also at step 0)
    subset: int = 0  # > 0: keep only this many training and test examples (quick runs, tests)
    seed: int = 0  # seeds the validation split

    def __post_init__(self) -> None:
        bad = [m for m in self.models if m not in MODELS.names()]
        if bad or not self.models:
            raise ValueError(f"models {bad or '()'} unknown; choose from {MODELS.names()}")
        if not self.seeds:
            raise ValueError("seeds is empty: give at least one seed, e.g. seeds=0,1,2")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not self.weight_decays or min(self.weight_decays) < 0:
            raise ValueError(
                f"weight_decays must be a non-empty grid of values >= 0, got {self.weight_decays}"
            )
        if self.subset < 0:
            raise ValueError(f"subset must be >= 0 (0: all examples), got {self.subset}")
        if len(self.cnn_channels) != 2:
            raise ValueError(f"cnn_channels must be two conv widths, got {self.cnn_channels}")
        check_min(self, "steps batch_size sos_every sos_batch "
                  "os_rows curv_rows eval_every curv_every width")
        if self.trace_probes < 2 or self.last_probes < 2:
            raise ValueError(
                "trace_probes and last_probes must be >= 2 (a standard error needs two probes)"
            )


def prepare_data(cfg: OptimumShiftingConfig) -> tuple[Any, Any]:
    """``(fit, tune)``: ``fit`` trains on the training set minus the validation split and tests
    on the test set; ``tune`` trains on the same and "tests" on the validation split."""
    splits = load_study_data(cfg.dataset, cfg.data_root, cfg.preprocess)
    dtype = torch.get_default_dtype()
    n, m = len(splits.train_y), len(splits.test_y)
    if cfg.subset:
        n, m = min(n, cfg.subset), min(m, cfg.subset)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_val = max(1, int(cfg.val_fraction * n))
    val, train = perm[:n_val], perm[n_val:]
    x = splits.train_x.to(dtype)
    common = {
        "train_x": x[train],
        "train_y": splits.train_y[train],
        "num_classes": splits.num_classes,
        "input_shape": tuple(x.shape[1:]),
    }
    if cfg.batch_size > len(train):
        raise ConfigError(
            f"batch_size={cfg.batch_size} exceeds the {len(train)} training "
            "examples left after the validation split; lower batch_size"
        )
    fit = SimpleNamespace(**common, test_x=splits.test_x[:m].to(dtype), test_y=splits.test_y[:m])
    tune = SimpleNamespace(**common, test_x=x[val], test_y=splits.train_y[val])
    return fit, tune


def make_model(cfg: OptimumShiftingConfig, name: str, data: Any, seed: int) -> nn.Module:
    seed_all(seed)
    kw: dict[str, Any] = {}
    if name == "resnet":
        kw = {"width": cfg.width}
    elif name == "cnn":
        kw = {"channels": tuple(cfg.cnn_channels), "hidden": cfg.cnn_hidden}
    return build_model(name, data.input_shape, data.num_classes, **kw).to(torch.get_default_dtype())


def curvature(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    cfg: OptimumShiftingConfig,
    seed: int,
    eigen: bool,
) -> dict[str, float]:
    """Hessian trace (full and last layer, with standard errors) and, if ``eigen``, the top
    eigenvalue of the mean cross-entropy on ``batch``, in eval mode."""
    name, layer = last_linear(model)
    last = [f"{name}.{p}" for p, _ in layer.named_parameters()]
    op = HessianOperator(model, F.cross_entropy, batch, eval_mode=True, chunk_size=10)
    gen = torch.Generator().manual_seed(seed)
    op_last = HessianOperator(model, F.cross_entropy, batch, params=last, eval_mode=True)
    full = tail = None
    if cfg.exact:  # ReLU / max-pool / eval-BN nets: exact and cheaper than the probes
        try:
            full, tail = exact_trace(op), exact_trace(op_last)
        except NotPiecewiseLinearError:
            full = tail = None
    if full is None or tail is None:
        full = hutchinson_trace(op, cfg.trace_probes, batch_size=10, generator=gen)
        tail = hutchinson_trace(op_last, cfg.last_probes, batch_size=cfg.last_probes,
                                generator=gen)
    out = {
        "trace": full.value,
        "trace_se": full.std_error,
        "trace_last": tail.value,
        "trace_last_se": tail.std_error,
        "trace_exact": float(full.num_matvecs == 0),
        "v_norm": layer.weight.detach().norm().item(),
    }
    if eigen:
        out["lambda_max"] = top_eigenvalues(op, 1, tol=cfg.eig_tol, seed=seed).item()
    return out


def measure(
    trainer: Trainer, batch: tuple[Tensor, Tensor], cfg: OptimumShiftingConfig, seed: int
) -> dict[str, float]:
    """Everything reported before/after OS: losses, accuracies and curvature."""
    return {**trainer.evaluate(), **curvature(trainer.model, batch, cfg, seed, eigen=True)}


def train_one(
    cfg: OptimumShiftingConfig,
    run: Run | None,
    model_name: str,
    method: str,
    seed: int,
    data: Any,
    wd: float,
    tag: str,
) -> Trainer:
    """Train one (model, method, seed); logs ``<tag>/train/...``, ``<tag>/test/...`` and the
    curvature over training ``<tag>/curv/...`` every ``eval_every`` steps."""
    model = make_model(cfg, model_name, data, seed)
    opt = torch.optim.SGD(
        model.parameters(),
        lr=cfg.lr,
        momentum=cfg.momentum,
        weight_decay=wd if method == "wd" else 0.0,
    )
    curv_batch = (data.train_x[: cfg.curv_rows], data.train_y[: cfg.curv_rows])
    interventions: list[Any] = []
    if method == "sos":
        interventions.append(
            StochasticOptimumShift(
                lambda m: last_linear(m)[1],
                every=cfg.sos_every,
                batch_size=cfg.sos_batch,
                data=data.train_x,
                seed=seed,
            )
        )

    def log_curvature(state: Any) -> None:
        vals = curvature(state.model, curv_batch, cfg, seed, eigen=False)
        if run is not None:  # always true here; keeps the type checker quiet
            run.log(state.step, {f"{tag}/curv/{k}": v for k, v in vals.items()})

    if run is not None:  # the weight-decay grid only needs its final validation accuracy
        interventions += [
            OnEvent(Event.FIT_START, log_curvature),  # step 0 (no batch yet)
            OnEvent(Event.BATCH_END, log_curvature, every(cfg.curv_every)),
        ]
    trainer = Trainer(
        model,
        opt,
        data,
        batch_size=cfg.batch_size,
        seed=seed,
        run=run,
        tag=tag,
        interventions=interventions,
        recording=Recording(loss=None, eval=every(cfg.eval_every), checkpoint=None),
    )
    if run is not None:
        run.truncate_after(-1, prefix=f"{tag}/")  # an interrupted pair starts over
    trainer.fit(cfg.steps)
    return trainer


def tune_weight_decay(cfg: OptimumShiftingConfig, run: Run, model_name: str, tune: Any) -> float:
    """The grid value with the best validation accuracy (ties: the smaller), first seed."""
    scores = {}
    for wd in cfg.weight_decays:
        key = f"{model_name}/tune/wd={wd:g}/val_acc"
        done = run.history(key)[1]
        if len(done) == 0:
            tr = train_one(cfg, None, model_name, "wd", cfg.seeds[0], tune, wd, "")
            run.log(cfg.steps, {key: tr.evaluate()["test/acc"]})
            done = run.history(key)[1]
        scores[wd] = float(done[-1])
    best = max(sorted(scores), key=lambda w: scores[w])
    run.log(cfg.steps, {f"{model_name}/tune/best_wd": best})
    return best


def run_pair(
    cfg: OptimumShiftingConfig,
    run: Run,
    model_name: str,
    method: str,
    seed: int,
    fit: Any,
    wd: float,
) -> None:
    """Train, measure, apply post hoc OS, measure again; ``<tag>/end/*`` and ``<tag>/os/*``."""
    tag = f"{model_name}/{method}/s{seed}"
    if len(run.history(f"{tag}/done")[0]):
        return
    trainer = train_one(cfg, run, model_name, method, seed, fit, wd, tag)
    batch = (fit.train_x[: cfg.curv_rows], fit.train_y[: cfg.curv_rows])
    before = measure(trainer, batch, cfg, seed)
    layer = last_linear(trainer.model)[1]
    rows = torch.randperm(len(fit.train_y), generator=torch.Generator().manual_seed(seed))
    feats = collect_features(trainer.model, layer, fit.train_x[rows[: cfg.os_rows]])
    rep = optimum_shift(layer, feats)
    after = measure(trainer, batch, cfg, seed)
    step = cfg.steps
    run.log(step, {f"{tag}/end/{k}": v for k, v in before.items()})
    run.log(step, {f"{tag}/os/{k}": v for k, v in after.items()})
    sos = next((iv for iv in trainer.interventions if isinstance(iv, StochasticOptimumShift)), None)
    run.log(
        step,
        {
            f"{tag}/os/rank": rep.rank,
            f"{tag}/os/rows": rep.num_rows,
            f"{tag}/os/max_rel_change": rep.max_rel_change,
            f"{tag}/sos/max_rel_change": max(
                (r.max_rel_change for _, r in sos.reports), default=0.0
            )
            if sos
            else 0.0,
            f"{tag}/done": 1.0,
        },
    )


def run_optimum_shifting(cfg: OptimumShiftingConfig, run: Run) -> None:
    """Every model: tune the baseline's weight decay, then every seed x method."""
    fit, tune = prepare_data(cfg)
    for model_name in cfg.models:
        wd = tune_weight_decay(cfg, run, model_name, tune)
        for seed in cfg.seeds:
            for method in METHODS:
                run_pair(cfg, run, model_name, method, seed, fit, wd)


def _report(runs: list[Run], out_dir: Path) -> list[Path]:
    from graddyn.experiments._optimum_shifting_report import report_optimum_shifting

    return report_optimum_shifting(runs, out_dir)


register_experiment(
    "optimum-shifting",
    "Optimum shifting (OS / stochastic OS) vs SGD and tuned weight decay, with Hessian trace.",
    OptimumShiftingConfig, run_optimum_shifting, _report,
    demo=OptimumShiftingConfig(models=("cnn",), seeds=(0, 1), steps=150))
