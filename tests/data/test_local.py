"""Local datasets in torchvision's layout, from tiny fake files in exactly those formats."""

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from graddyn.data import DatasetFormatError, DatasetNotFoundError, load_dataset, read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_dataset(root, folder, gz, n_train=6, n_test=4, seed=0):
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test),
    }
    for stem, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (raw / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (raw / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")]
)
def test_idx_datasets_round_trip(tmp_path, name, folder, gz):
    arrays = _write_idx_dataset(tmp_path, folder, gz)
    d = load_dataset(name, root=tmp_path, standardize=False)
    assert d.input_shape == (1, 28, 28) and d.num_classes == 10 and d.name == name
    expected = torch.tensor(arrays["train-images-idx3-ubyte"], dtype=torch.float32)[:, None] / 255
    assert torch.allclose(d.train_x, expected)
    assert torch.equal(d.test_y, torch.tensor(arrays["t10k-labels-idx1-ubyte"]))
    assert d.train_x.dtype == torch.float32


def test_root_from_environment(tmp_path, monkeypatch):
    _write_idx_dataset(tmp_path, "MNIST", gz=False)
    monkeypatch.setenv("GRADDYN_DATA", str(tmp_path))
    assert len(load_dataset("mnist").train_y) == 6


def _write_cifar(root, hundred):
    rng = np.random.default_rng(0)
    key = "fine_labels" if hundred else "labels"

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                key: rng.integers(0, 100 if hundred else 10, n).tolist()}

    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir()
    names = ["train", "test"] if hundred else [*(f"data_batch_{i}" for i in range(1, 6)),
                                               "test_batch"]
    batches = {}
    for name in names:
        batches[name] = batch(3)
        (folder / name).write_bytes(pickle.dumps(batches[name]))
    return batches


@pytest.mark.parametrize("hundred", [False, True], ids=["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path, hundred):
    batches = _write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    d = load_dataset(name, root=tmp_path, standardize=False)
    assert d.num_classes == (100 if hundred else 10) and d.input_shape == (3, 32, 32)
    first = batches["train" if hundred else "data_batch_1"]
    # row layout: 1024 red, then green, then blue values, each 32x32 row-major
    assert torch.allclose(d.train_x[0, 1, 0, :], torch.tensor(first["data"][0, 1024:1056] / 255,
                                                             dtype=torch.float32))
    assert len(d.train_y) == (3 if hundred else 15) and len(d.test_y) == 3
    key = "fine_labels" if hundred else "labels"
    assert d.train_y[:3].tolist() == first[key]


def test_cifar_standardized_with_train_stats(tmp_path):
    _write_cifar(tmp_path, hundred=False)
    d = load_dataset("cifar10", root=tmp_path)
    mean = d.train_x.mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.zeros(3, dtype=torch.float32), atol=1e-5)


@pytest.mark.parametrize(("name", "expected"), [
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"),
    ("fashion-mnist", "FashionMNIST/raw/t10k-labels-idx1-ubyte"),
    ("cifar10", "cifar-10-batches-py/data_batch_5"),
    ("cifar100", "cifar-100-python/test"),
])
def test_missing_files_name_the_paths_and_the_fix(tmp_path, name, expected):
    with pytest.raises(DatasetNotFoundError, match="download=True") as info:
        load_dataset(name, root=tmp_path)
    assert str(tmp_path / expected) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_partially_missing_idx_lists_only_the_missing(tmp_path):
    _write_idx_dataset(tmp_path, "MNIST", gz=True)
    (tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist", root=tmp_path)
    assert "t10k-labels" in str(info.value) and "train-images" not in str(info.value)


def test_read_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(DatasetFormatError, match="not an idx file"):
        read_idx(path)


def test_read_idx_rejects_truncated_data(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(_idx_bytes(np.zeros((2, 3)))[:-1])
    with pytest.raises(DatasetFormatError, match="header says shape"):
        read_idx(path)


def test_cifar_rejects_a_non_batch_pickle(tmp_path):
    _write_cifar(tmp_path, hundred=True)
    (tmp_path / "cifar-100-python/test").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetFormatError, match="not a CIFAR batch"):
        load_dataset("cifar100", root=tmp_path)


@pytest.mark.parametrize("where", ["whole-file", "inside-the-dict"])
def test_cifar_payload_never_runs(tmp_path, code_payload, where):
    _write_cifar(tmp_path, hundred=True)
    make_payload, marker = code_payload
    wrap = None if where == "whole-file" else (lambda p: {"data": p, "fine_labels": [0]})
    bad = tmp_path / "cifar-100-python/train"
    bad.write_bytes(make_payload(wrap))
    with pytest.raises(DatasetFormatError, match="refers to io.open, which a CIFAR batch never"
                                                 " holds") as info:
        load_dataset("cifar100", root=tmp_path)
    assert str(bad) in str(info.value) and "official archive" in str(info.value)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_loads_every_pickle_protocol_and_numpy_1_files(tmp_path, protocol):
    batches = _write_cifar(tmp_path, hundred=False)
    first = tmp_path / "cifar-10-batches-py/data_batch_1"
    raw = pickle.dumps(batches["data_batch_1"], protocol=protocol)
    if protocol == 2:  # as the official files (Python 2, NumPy 1) name NumPy's functions
        raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray" in raw
    first.write_bytes(raw)
    d = load_dataset("cifar10", root=tmp_path, standardize=False)
    assert d.train_y[:3].tolist() == batches["data_batch_1"]["labels"]


def test_cifar_truncated_file_names_the_file(tmp_path):
    _write_cifar(tmp_path, hundred=True)
    bad = tmp_path / "cifar-100-python/test"
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DatasetFormatError, match="not a readable CIFAR batch") as info:
        load_dataset("cifar100", root=tmp_path)
    assert str(bad) in str(info.value)
