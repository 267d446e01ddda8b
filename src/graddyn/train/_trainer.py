"""The training loop: one small explicit ``Trainer``; see ``Event`` for the annotated loop.

Typical use inside an experiment's ``run(config, run)``::

    seed_all(cfg.seed)
    model = build_model("mlp", splits.input_shape, splits.num_classes)
    trainer = Trainer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), splits, batch_size=100,
        seed=cfg.seed, run=run,
        probes=Probes([(Coherence(), every(10)), (Stiffness(), logspaced(20, cfg.steps))]),
        recording=Recording(eval=every(100) | at_end, checkpoint=every(500) | at_end),
    )
    trainer.fit(cfg.steps)        # resumes from the run's latest checkpoint if there is one
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from graddyn._losses import LossFn, per_example_cross_entropy
from graddyn.models._utils import evaluate
from graddyn.pergrad import Capture, capture
from graddyn.pergrad._distributed import gather_rows, unwrap
from graddyn.train._events import Batch, Event, Intervention, State
from graddyn.train._gradient import GradientStep, MeanLoss
from graddyn.train._measured import MeasuredMean
from graddyn.train._probes import ProbeRunner, Probes, load_state_dict_into, state_dict_of
from graddyn.train._rng import get_rng_state, set_rng_state
from graddyn.train._sampler import EpochSampler
from graddyn.train._schedules import StepPredicate, at_end, every, fires
from graddyn.train._store import Run

_PROGRESS = [os.environ.get("GRADDYN_QUIET", "") in ("", "0")]
_EVERY_STEP = every(1)


def set_progress(enabled: bool) -> None:
    """Turn progress bars on or off for every ``Trainer`` that does not say (tests, workers)."""
    _PROGRESS[0] = enabled


def progress_enabled() -> bool:
    """Whether trainers show a progress bar by default (env ``GRADDYN_QUIET=1`` turns it off)."""
    return _PROGRESS[0]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the message names the step."""


@dataclass(frozen=True)
class Recording:
    """When a ``Trainer`` records (None: never) ``loss``, the batch loss; ``eval``, loss and
    accuracy on the training and test sets (``evaluate``, ``eval_batch_size`` at a time);
    ``checkpoint``, the run's checkpoints."""

    loss: StepPredicate | None = _EVERY_STEP
    eval: StepPredicate | None = None
    eval_batch_size: int = 1000
    checkpoint: StepPredicate | None = at_end


_NO_PROBES, _DEFAULT_RECORDING = Probes(), Recording()


class Trainer:
    """Train ``model`` on ``data`` (anything with ``train_x (N, ...)``, ``train_y (N,)`` and
    optionally ``test_x``, ``test_y``, e.g. ``graddyn.data.DataSplits``) with minibatches drawn
    without replacement, a fresh permutation per epoch, the last short batch dropped (as
    ``graddyn.data.iterate_minibatches``). ``batch_size=None`` is full-batch training.

    seed:        seeds the data order and the probe subset (seed the model yourself, with
                 ``seed_all``, before building it).
    gradient:    fills ``p.grad`` for a batch (default ``MeanLoss``); see ``GradientStep``.
    probes:      the instruments and the examples they measure (``Probes``).
    recording:   when the batch loss, the evaluation and checkpoints are recorded.
    tag:         prefix of metric names and subfolder of checkpoints, so several trainers can
                 share one run (e.g. one per noise level).

    Data parallel: pass the model wrapped in ``DistributedDataParallel`` (every rank runs the
    same Trainer under ``torchrun``). ``batch_size`` is then the global batch: every rank draws
    the same one and trains on its contiguous share (rank order), so the run follows
    single-process training on the global batch. Batch instruments see the global batch
    (``capture(process_group=...)`` gathers each layer's factors; ``p.grad`` is their global
    mean, the same on every rank, so DDP's all-reduce is not needed on those steps and never
    fires: the engine computes ``p.grad`` without ``.backward()``); other steps are plain DDP
    steps. A ``run`` opened read-only (ranks other than 0) is read to resume, never written.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: Any,
        *,
        batch_size: int | None = 100,
        seed: int = 0,
        loss_fn: LossFn = per_example_cross_entropy,
        gradient: GradientStep | None = None,
        interventions: Sequence[Intervention] = (),
        probes: Probes = _NO_PROBES,
        recording: Recording = _DEFAULT_RECORDING,
        lr_scheduler: Any = None,
        run: Run | None = None,
        tag: str = "",
        progress: bool | None = None,
    ) -> None:
        self.model, self.optimizer, self.data = model, optimizer, data
        self.x, self.y = data.train_x, data.train_y
        n = len(self.y)
        self.batch_size = n if batch_size is None else batch_size
        if not 1 <= self.batch_size <= n:
            raise ValueError(
                f"batch_size={batch_size} must be between 1 and the training set size {n}"
            )
        self._group = model.process_group if isinstance(model, DDP) else None
        world = 1 if self._group is None else dist.get_world_size(self._group)
        self.loss_fn, self.gradient = loss_fn, gradient or MeanLoss()
        plain = isinstance(self.gradient, MeanLoss)
        if self._group is not None and (self.batch_size % world or not plain):
            raise ValueError(
                f"under DistributedDataParallel batch_size is the global batch, split among "
                f"the {world} ranks, and the gradient is DDP's mean: batch_size={batch_size} "
                f"must be a multiple of {world}, and gradient must be the default MeanLoss")
        if probes.batch_instruments and not plain:
            raise ValueError(
                "batch_instruments reuse the plain mean-gradient backward, so they cannot be "
                f"combined with gradient={type(gradient).__name__}; measure them on the probe "
                "set (Probes(instruments=...)) instead")
        self.interventions = list(interventions)
        self.run, self.lr_scheduler, self.recording = run, lr_scheduler, recording
        self.tag, self.prefix, self.progress = tag, f"{tag}/" if tag else "", progress
        probe_gen = torch.Generator().manual_seed(seed + 7919)  # independent of data order
        probe_idx = torch.randperm(n, generator=probe_gen)[: min(probes.size, n)].sort().values
        self.probes = ProbeRunner(probes.instruments, probe_idx, probes.batch_size,
                                  probes.backward)
        self.batch_probes = ProbeRunner(probes.batch_instruments)  # schedules only
        clash = ({i.name for i, _ in self.probes.instruments}
                 & {i.name for i, _ in self.batch_probes.instruments})
        if clash:
            raise ValueError(f"instruments {sorted(clash)} are both probe and batch "
                             "instruments; their metrics would share names: keep one")
        self.sampler = EpochSampler(n, self.batch_size, seed)
        self._measured: MeasuredMean | None = None  # this step's, until it is recorded
        self.state: State | None = None
        self._cap: Capture | None = None  # open during fit() when batch instruments exist
        # (step, name, value) records when there is no run to log to
        self.history: list[tuple[int, str, float]] = []

    # ---- the loop -------------------------------------------------------------------------
    def fit(self, max_steps: int) -> State:
        """Train until ``max_steps`` optimizer steps (in total, not more). The first call
        continues from the run's latest checkpoint (under ``tag``) if there is one, dropping
        metrics logged after it; a later call continues from where the previous one stopped."""
        if self.state is not None:  # a second fit() continues where the first stopped
            st, resumed = self.state, True
            st.max_steps = max_steps
        else:
            st = State(self.model, self.optimizer, max_steps, run=self.run)
            self.state = st
            resumed = self._resume(st)
        self._fire(Event.FIT_START, st)
        if not resumed:
            self._record(st, last=max_steps == 0)
        show = _PROGRESS[0] if self.progress is None else self.progress
        with tqdm(total=max_steps, initial=st.step, disable=not show, leave=False,
                  desc=self.tag or "train", dynamic_ncols=True) as bar, self._capture():
            while st.step < max_steps:
                self._train_step(st)
                self._record(st, last=st.step == max_steps)
                bar.update(1)
        self._fire(Event.FIT_END, st)
        return st

    @contextmanager
    def _capture(self) -> Iterator[None]:
        """One capture of the model for the whole fit, rearmed on each measured step: its
        hooks are installed once instead of every step (docs/benchmarks_overhead.md). It records
        nothing between steps; it re-hooks if the parameters change."""
        if not self.batch_probes.instruments:
            yield
            return
        with capture(self.model, process_group=self._group) as cap:
            self._cap = cap
            try:
                yield
            finally:
                self._cap = None

    def _train_step(self, st: State) -> None:
        idx, starts = self.sampler.next()
        if starts:
            self._fire(Event.EPOCH_START, st)
        mine = idx if self._group is None else idx.tensor_split(
            dist.get_world_size(self._group))[dist.get_rank(self._group)]  # this rank's share
        st.batch = Batch(self.x[mine], self.y[mine], mine)
        self._fire(Event.BATCH_START, st)
        due = self.batch_probes.due(st.step + 1, st.step + 1 == st.max_steps)
        if due:  # measured on this batch, at these weights: the step's own backward, which
            # writes over last step's p.grad buffers and checks the losses before it writes
            self._measured = MeasuredMean(due, self._cap, st.step, self._gather,
                                          partial(self._check_finite, st))
            losses = self._measured(self.model, self.loss_fn, st.batch)  # (B,) global
        else:
            self.optimizer.zero_grad(set_to_none=True)
            losses = self._gather(self.gradient(self.model, self.loss_fn, st.batch))  # global
            self._check_finite(st, losses)
        st.losses = losses
        self._fire(Event.AFTER_BACKWARD, st)
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        st.step += 1
        self._fire(Event.AFTER_STEP, st)

    def _gather(self, t: Tensor) -> Tensor:
        """Under DDP every rank's rows of ``t``, in rank order: the global batch's."""
        return t if self._group is None else gather_rows(t, self._group)

    def _check_finite(self, st: State, losses: Tensor) -> None:
        if not bool(torch.isfinite(losses).all()):
            raise NonFiniteLossError(
                f"training loss is not finite at step {st.step + 1} (mean {losses.mean():.4g}); "
                f"everything up to step {st.step} is recorded"
                + (f" in {self.run.dir}" if self.run else "")
                + "; lower the learning rate, or check the data and the loss function"
            )

    def _record(self, st: State, last: bool) -> None:
        """Measurements at ``st.step``, BATCH_END / EPOCH_END, then the checkpoint."""
        rec = self.recording
        metrics: dict[str, float] = {}
        if st.losses is not None and fires(rec.loss, st.step, last):
            metrics["train/batch_loss"] = float(st.losses.mean())
        if fires(rec.eval, st.step, last):
            metrics.update(self.evaluate())
        scalars, arrays = self.probes.run(st.step, last, self.model, self.loss_fn, self.x,
                                          self.y)
        metrics.update(scalars)
        if self._measured is not None and self._measured.results is not None:
            batch_scalars, batch_arrays = self._measured.results
            metrics.update(batch_scalars)
            arrays = {**arrays, **batch_arrays}
        self._measured = None
        self._log(st.step, metrics, arrays)
        if st.batch is not None:
            self._fire(Event.BATCH_END, st)
        if self.sampler.epoch_done:
            self._fire(Event.EPOCH_END, st)
            st.epoch += 1
            self.sampler.end_epoch()
        if (self.run is not None and not self.run.readonly
                and fires(rec.checkpoint, st.step, last)):
            self.run.save_checkpoint(st.step, self.checkpoint_state(st), tag=self.tag)

    def _log(self, step: int, metrics: dict[str, float], arrays: dict[str, Any]) -> None:
        if self.run is None or self.run.readonly:
            self.history.extend((step, self.prefix + k, v) for k, v in metrics.items())
            return
        if metrics:
            self.run.log(step, {self.prefix + k: v for k, v in metrics.items()})
        for name, value in arrays.items():
            self.run.log_array(self.prefix + name, value, step=step)

    def _fire(self, event: Event, st: State) -> None:
        for iv in self.interventions:
            if iv.match(event, st):
                iv.apply(event, st)

    # ---- evaluation -----------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Mean loss (and accuracy, for class logits) on the training and test sets, in eval
        mode, ``eval_batch_size`` examples at a time. Keys ``train/loss``, ``train/acc``, ..."""
        out: dict[str, float] = {}
        for split in ("train", "test"):
            x, y = (getattr(self.data, f"{split}_{k}", None) for k in "xy")
            if x is not None and y is not None and len(y) > 0:
                out[f"{split}/loss"], acc = evaluate(self.model, x, y,
                                                     self.recording.eval_batch_size,
                                                     self.loss_fn)
                if acc is not None:
                    out[f"{split}/acc"] = acc
        return out

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint_state(self, st: State) -> dict[str, Any]:
        """Everything needed to continue bit for bit, as tensors and plain containers.
        ``lr`` / ``lrs``: the learning rate(s) in effect for the next step (TracIn's eta_t)."""
        groups = self.optimizer.param_groups
        return {
            "step": st.step, "epoch": st.epoch, **self.sampler.state_dict(),
            "model": unwrap(self.model).state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr": float(groups[0]["lr"]), "lrs": [float(g["lr"]) for g in groups],
            "rng": get_rng_state(),
            "lr_scheduler": state_dict_of(self.lr_scheduler),
            "rule": state_dict_of(self.gradient),  # the key of older checkpoints
            "interventions": [state_dict_of(iv) for iv in self.interventions],
            "instruments": self.probes.state_dicts(),
            "batch_instruments": self.batch_probes.state_dicts(),
        }

    def load_checkpoint_state(self, st: State, ck: dict[str, Any]) -> None:
        """Inverse of ``checkpoint_state``."""
        unwrap(self.model).load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        load_state_dict_into(self.lr_scheduler, ck["lr_scheduler"])
        load_state_dict_into(self.gradient, ck["rule"])
        for iv, sd in zip(self.interventions, ck["interventions"]):
            load_state_dict_into(iv, sd)
        self.probes.load_state_dicts(ck["instruments"])
        self.batch_probes.load_state_dicts(ck.get("batch_instruments", []))
        set_rng_state(ck["rng"])
        self.sampler.load_state_dict(ck)
        st.step, st.epoch = ck["step"], ck["epoch"]

    def _resume(self, st: State) -> bool:
        if self.run is None:
            return False
        latest = self.run.latest_checkpoint(self.tag)
        if latest is None:
            return False
        step, ck = latest
        if step > st.max_steps:
            raise ValueError(
                f"run {self.run.name!r} has a checkpoint at step {step}, past max_steps="
                f"{st.max_steps}; start a new run (--name) or raise the number of steps"
            )
        self.load_checkpoint_state(st, ck)
        if not self.run.readonly:
            self.run.truncate_after(step, prefix=self.prefix)
        if step > 0:
            self._recreate_grad_buffers()
        return True

    def _recreate_grad_buffers(self) -> None:
        """After step 1 an uninterrupted run always has ``p.grad`` buffers (each step's
        backward leaves them), and the engine writes the next mean gradient *into* them
        (one fused ``addmm``), which rounds differently from the fresh product it returns
        when there is no buffer. A resumed run recreates them so that its next measured
        step takes the same path: bit for bit. Their values are never read: every step
        overwrites or clears ``p.grad`` first."""
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
