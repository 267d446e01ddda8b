"""What every multi-seed study shares: checking its ``seeds`` and loading its data with the
configured input preprocessing.

Preprocessing (``preprocess``): ``"scale"`` divides pixels by their maximum (255 for MNIST,
as the coherent-gradients code does; MNIST-1D keeps its generator's normalisation);
``"standardize"`` also subtracts the training mean and divides by the training standard
deviation per channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

from graddyn.experiments._config import ConfigError

PREPROCESS = ("scale", "standardize")


def check_seeds(seeds: Sequence[int]) -> None:
    """``ValueError`` naming the fix unless ``seeds`` is a non-empty list of distinct ints."""
    if not seeds:
        raise ConfigError("seeds must be a non-empty list, e.g. seeds=0,1,2 (verdicts need >= 2)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {tuple(seeds)}: a repeated seed repeats "
                         "the same run and shrinks the interval falsely")


def load_study_data(name: str, root: str, preprocess: str):  # -> DataSplits
    """Dataset ``name`` with ``preprocess`` (see the module docstring); ``root`` "" is the
    default data folder."""
    from graddyn.data import dataset_options, load_dataset

    if preprocess not in PREPROCESS:
        raise ConfigError(f"preprocess must be one of {', '.join(PREPROCESS)}, got "
                         f"{preprocess!r}")
    if "standardize" not in dataset_options(name):
        raise ConfigError(f"dataset {name!r} has no input preprocessing to choose; use an image "
                         "or signal dataset (mnist-subset, mnist1d, digits, mnist, ...)")
    return load_dataset(name, root=root or None, standardize=preprocess == "standardize")


def noisy_subset(splits: Any, n_train: int, noise: float, seed: int
                 ) -> tuple[SimpleNamespace, Any]:
    """The label-noise studies' training set: a random subset of ``n_train`` examples (all if
    0; drawn with ``seed``) with a ``noise`` fraction of its labels shuffled among themselves
    (``graddyn.data.corrupt_labels``, drawn with ``seed + 1``), and the clean test set.
    Returns (data with ``train_x, train_y, clean_y, test_x, test_y``, corrupt mask (N,))."""
    import torch

    from graddyn.data import corrupt_labels

    x, y = splits.train_x, splits.train_y
    if n_train:
        if n_train > len(y):
            raise ConfigError(f"n_train={n_train} exceeds the {len(y)} training examples of "
                             f"{splits.name!r}; set n_train={len(y)} or lower (0: all)")
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        keep = keep[:n_train].sort().values
        x, y = x[keep], y[keep]
    labels, mask = corrupt_labels(y, noise, torch.Generator().manual_seed(seed + 1))
    data = SimpleNamespace(train_x=x, train_y=labels, clean_y=y, test_x=splits.test_x,
                           test_y=splits.test_y)
    return data, mask


class SeedRun:
    """One seed's view of a ``Run``: metric and array names get the prefix ``seed<s>/``, so
    a study written for one seed logs and reads every seed of a multi-seed run unchanged.
    ``metric_names()`` lists this seed's names without the prefix; ``name`` and ``dir`` are
    the run's."""

    def __init__(self, run: Any, seed: int) -> None:
        self.run, self.seed, self.prefix = run, seed, f"seed{seed}/"
        self.name, self.dir, self.config = run.name, run.dir, run.config

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(step, {self.prefix + k: v for k, v in metrics.items()})

    def history(self, name: str) -> Any:
        return self.run.history(self.prefix + name)

    def metric_names(self) -> list[str]:
        n = len(self.prefix)
        return [m[n:] for m in self.run.metric_names() if m.startswith(self.prefix)]

    def log_array(self, name: str, array: Any) -> Any:
        return self.run.log_array(self.prefix + name, array)

    def load_array(self, name: str) -> Any:
        return self.run.load_array(self.prefix + name)


def each_seed_once(run: Any, seeds: Sequence[int], work: Any) -> None:
    """The resume contract of a study with its own loop: ``work(seed, SeedRun)``, seeded by
    that seed alone, runs once per seed. A resumed run skips finished seeds (``done``) and
    redoes an interrupted one from scratch: the records of an uninterrupted run."""
    recorded = set(run.metric_names())  # another seed's work does not change this seed's
    for seed in seeds:
        view = SeedRun(run, seed)
        if f"{view.prefix}done" in recorded:
            continue
        run.truncate_after(-1, prefix=view.prefix)
        work(seed, view)
        view.log(0, {"done": 1.0})
