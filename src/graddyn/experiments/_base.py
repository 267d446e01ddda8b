"""The experiment contract: a frozen dataclass ``Config``, ``run(config, run)`` and
``report(runs, out_dir)``, registered by name in ``EXPERIMENTS``.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class HelloConfig:
...     steps: int = 10
...     seed: int = 0
>>> class Hello(Experiment):
...     Config = HelloConfig
...     def run(self, config, run):
...         run.log(config.steps, {"done": 1.0})
"""

from __future__ import annotations

import inspect
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from graddyn._registry import Registry

if TYPE_CHECKING:  # graddyn.train imports torch: not needed to list or describe experiments
    from graddyn.train import Run


class Experiment(ABC):
    """A named, configurable study. Subclasses set ``Config`` (a frozen dataclass whose fields
    all have defaults and plain types: int, float, bool, str, tuples, ``Literal`` choices) and
    implement ``run``; ``report`` has a generic default (every metric over steps).

    The framework (``graddyn run``) creates the ``Run``, saves the resolved config, seed,
    versions and git SHA, seeds everything with ``config.seed`` (if the config has one), calls
    ``run``, and marks the run finished, failed or interrupted. ``run`` must be resumable:
    build the same objects again and call ``Trainer.fit``, which continues from the run's
    latest checkpoint; a study with its own loop runs each seed through
    ``_seeds.each_seed_once`` (or keeps checkpoints of its own, as ``lsgd`` does).
    ``tests/experiments/test_resume_contract.py`` checks every registered experiment.
    """

    Config: ClassVar[type[Any]]

    @abstractmethod
    def run(self, config: Any, run: Run) -> None:
        """Do the work; log metrics, checkpoints and arrays through ``run``."""

    def report(self, runs: list[Run], out_dir: Path) -> list[Path]:
        """Draw figures for one run or a sweep of runs into ``out_dir``; return PNG paths.
        Default: one panel per metric (up to 12), one line per run."""
        from graddyn.train import plot_histories

        names = sorted({n for r in runs for n in r.metric_names()})[:12]
        if not names:
            return []
        return [plot_histories(runs, names, Path(out_dir) / "metrics.png")]

    def demo_config(self) -> Any:
        """The short configuration ``graddyn demo`` runs (default: ``Config()``)."""
        return self.Config()

    @classmethod
    def summary(cls) -> str:
        """First sentence of the class docstring (shown by ``graddyn list``)."""
        return first_sentence(cls.__doc__ or "")


def first_sentence(doc: str) -> str:
    """The first sentence of a docstring's first paragraph on one line, without reST
    markup (````code```` -> ``code``).

    >>> first_sentence("Tracks ``learned_at``\\nsteps. More text.\\n\\nDetails.")
    'Tracks learned_at steps.'
    """
    para = " ".join(inspect.cleandoc(doc).split("\n\n")[0].split())
    para = re.sub(r"``([^`]*)``", r"\1", para).replace(":math:", "")
    # a full stop before a capital or the end, not that of "e.g.", "i.e.", "et al."
    match = re.search(r"(?<!\be\.g)(?<!\bi\.e)(?<!\bal)\.(?=\s+[A-Z]|\s*$)", para)
    return para[: match.start() + 1] if match else para


# name -> Experiment subclass; each module graddyn/experiments/<name>.py registers itself.
EXPERIMENTS: Registry[type[Experiment]] = Registry("experiment")


def register_experiment(name: str, summary: str, config: type[Any],
                        run: Callable[[Any, Run], None],
                        report: Callable[[list[Run], Path], list[Path]],
                        demo: Any = None) -> type[Experiment]:
    """Register a config class with plain ``run`` / ``report`` functions as an
    ``Experiment``. ``summary``: its docstring (a string literal: ``graddyn list`` reads it
    from the source); ``demo``: the config ``graddyn demo`` runs (default ``config()``)."""
    body: dict[str, Any] = {
        "__doc__": summary, "__module__": getattr(run, "__module__", __name__),
        "Config": config,
        "run": lambda self, cfg, r: run(cfg, r),
        "report": lambda self, runs, out_dir: report(runs, Path(out_dir)),
    }
    if demo is not None:
        body["demo_config"] = lambda self: demo
    cls = type(config.__name__.removesuffix("Config") or name, (Experiment,), body)
    return EXPERIMENTS.register(name)(cls)
