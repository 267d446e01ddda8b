"""The training loop, schedules, events, the run store, checkpoints and report helpers.

One small explicit loop (``Trainer``) whose extension points are: a ``GradientStep`` (how a
batch becomes ``p.grad``), interventions acting at ``Event``s, and instruments on schedules,
measured on a fixed probe set or on each training minibatch from the step's own backward.
Runs live in a ``RunStore`` (SQLite + checkpoint files) and resume bit for bit.
"""

from graddyn._losses import LossFn, per_example_cross_entropy
from graddyn.train._events import Batch, Event, Intervention, OnEvent, State
from graddyn.train._gradient import GradientStep, MeanLoss
from graddyn.train._measured import measured_backward
from graddyn.train._probes import ProbeBackward, Probes, capture_backward
from graddyn.train._report import new_figure, plot_histories, save_figure
from graddyn.train._report_html import write_html_report
from graddyn.train._rng import get_rng_state, seed_all, set_rng_state
from graddyn.train._sampler import EpochSampler
from graddyn.train._schedules import Schedule, at, at_end, every, fires, logspaced
from graddyn.train._store import (
    Run,
    RunExistsError,
    RunNotFoundError,
    RunStore,
    git_sha,
    package_versions,
)
from graddyn.train._trainer import NonFiniteLossError, Recording, Trainer, set_progress

__all__ = [
    "Batch", "EpochSampler", "Event", "GradientStep", "Intervention", "LossFn", "MeanLoss",
    "NonFiniteLossError", "OnEvent", "ProbeBackward", "Probes", "Recording",
    "Run", "RunExistsError", "RunNotFoundError", "RunStore", "Schedule", "State", "Trainer",
    "at", "at_end", "capture_backward", "every", "fires", "get_rng_state", "git_sha",
    "logspaced", "measured_backward", "new_figure", "package_versions",
    "per_example_cross_entropy", "plot_histories", "save_figure", "seed_all", "set_progress",
    "set_rng_state", "write_html_report",
]
