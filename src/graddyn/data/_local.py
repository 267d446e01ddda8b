"""Real datasets read from a local folder in torchvision's layout, without torchvision.

Expected files under ``root`` (``$GRADDYN_DATA`` or ``./data``), as torchvision's downloaders
write them; the idx files may be plain or gzipped (``.gz``)::

    MNIST/raw/{train-images-idx3-ubyte, train-labels-idx1-ubyte,
               t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte}
    FashionMNIST/raw/...           (same four names)
    cifar-10-batches-py/{data_batch_1, ..., data_batch_5, test_batch}
    cifar-100-python/{train, test}  (the 100 fine labels are used)

The CIFAR files are Python pickles. They are read with an unpickler that builds only what the
format holds (dicts, lists, strings, bytes, numbers and NumPy arrays); anything else, such as
a payload that would run code, is refused before it is built.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from graddyn.data._load import DATA_ENV_VAR, DATASETS
from graddyn.data._splits import DataSplits, to_splits

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

_TORCHVISION_CLASS = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


class DatasetNotFoundError(FileNotFoundError):
    """A local dataset's files are missing; the message names each expected path."""


class DatasetFormatError(ValueError):
    """A local dataset file exists but is not in the expected format."""


def _not_found(name: str, root: Path, missing: list[Path]) -> DatasetNotFoundError:
    cls = _TORCHVISION_CLASS[name]
    lines = "\n".join(f"  {p}" + (" (or .gz)" if "idx" in p.name else "") for p in missing)
    return DatasetNotFoundError(
        f"dataset {name!r}: missing file(s) under root {root}:\n{lines}\n"
        f"Obtain them on a machine with internet access with torchvision, e.g.\n"
        f"  python -c \"import torchvision; "
        f"torchvision.datasets.{cls}('{root}', train=True, download=True); "
        f"torchvision.datasets.{cls}('{root}', train=False, download=True)\"\n"
        f"and copy the folder here, or point root= / ${DATA_ENV_VAR} at where the files are. "
        f"Offline alternatives: 'digits', 'mnist-subset'."
    )


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (LeCun's MNIST format), plain or gzipped.

    Layout: 2 zero bytes, a dtype code, the number of dimensions ``d``, ``d`` big-endian
    uint32 sizes, then the data in C order.
    """
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(f"{path} is not an idx file (bad magic number {raw[:4]!r})")
    ndim = raw[3]
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    data = np.frombuffer(raw, _IDX_DTYPES[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetFormatError(f"{path}: header says shape {shape} but holds {data.size} values")
    return data.reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_idx_dataset(name: str, root: Path, standardize: bool) -> DataSplits:
    folder = root / _TORCHVISION_CLASS[name] / "raw"
    kinds = ("images-idx3-ubyte", "labels-idx1-ubyte")
    stems = [f"{s}-{k}" for s in ("train", "t10k") for k in kinds]
    found = {stem: _idx_file(folder, stem) for stem in stems}
    missing = [folder / stem for stem, path in found.items() if path is None]
    if missing:
        raise _not_found(name, root, missing)
    tr_x, tr_y, te_x, te_y = (read_idx(found[s]) for s in stems)  # type: ignore[arg-type]
    return to_splits(
        tr_x[:, None], tr_y, te_x[:, None], te_y, num_classes=10, name=name, scale=255.0,
        standardize_inputs=standardize,
    )


# (module, name) of every global a CIFAR batch refers to: NumPy's array reconstruction (by
# NumPy 1 and 2, pickle protocols 2-5) and the bytes helper of protocol 2. Nothing callable
# beyond these is ever looked up, so a ``__reduce__`` payload fails before it can run.
_CIFAR_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}
# NumPy 2 moved numpy.core to numpy._core; pickles name whichever wrote them
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # the official files are Python 2 pickles
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        home = module.replace("numpy._core", "numpy.core", 1)  # one spelling for both
        if (home, name) not in _CIFAR_GLOBALS:
            raise DatasetFormatError(
                f"{self.path} refers to {module}.{name}, which a CIFAR batch never holds "
                "(only dicts, lists, strings, bytes and NumPy arrays); refused without "
                "loading it. Replace the file with the one from the official archive"
            )
        if home.startswith("numpy.core"):
            module = _NUMPY_CORE + home[len("numpy.core"):]
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        try:
            entry = _CifarUnpickler(f, path).load()
        except DatasetFormatError:
            raise
        except Exception as err:  # truncated or not a pickle at all
            raise DatasetFormatError(f"{path} is not a readable CIFAR batch ({type(err).__name__}"
                                     f": {err}); replace it with the official file") from err
    if not isinstance(entry, dict) or "data" not in entry:
        raise DatasetFormatError(f"{path} is not a CIFAR batch (expected a dict with 'data')")
    return entry


def _load_cifar(name: str, root: Path, folder: str, train: list[str], test: str,
                label_key: str, num_classes: int, standardize: bool) -> DataSplits:
    base = root / folder
    missing = [base / f for f in [*train, test] if not (base / f).is_file()]
    if missing:
        raise _not_found(name, root, missing)

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        entries = [_unpickle(base / f) for f in files]
        x = np.concatenate([np.asarray(e["data"], dtype=np.uint8) for e in entries])
        y = np.concatenate([np.asarray(e[label_key], dtype=np.int64) for e in entries])
        return x.reshape(-1, 3, 32, 32), y  # rows are 1024 R, 1024 G, 1024 B values

    (tr_x, tr_y), (te_x, te_y) = read(train), read([test])
    return to_splits(tr_x, tr_y, te_x, te_y, num_classes=num_classes, name=name, scale=255.0,
                     standardize_inputs=standardize)


@DATASETS.register("mnist")
def load_mnist(root: Path, standardize: bool = True) -> DataSplits:
    """MNIST (60,000 / 10,000, ``(1, 28, 28)``) from ``root/MNIST/raw``."""
    return _load_idx_dataset("mnist", root, standardize)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(root: Path, standardize: bool = True) -> DataSplits:
    """Fashion-MNIST (60,000 / 10,000, ``(1, 28, 28)``) from ``root/FashionMNIST/raw``."""
    return _load_idx_dataset("fashion-mnist", root, standardize)


@DATASETS.register("cifar10")
def load_cifar10(root: Path, standardize: bool = True) -> DataSplits:
    """CIFAR-10 (50,000 / 10,000, ``(3, 32, 32)``) from ``root/cifar-10-batches-py``."""
    train = [f"data_batch_{i}" for i in range(1, 6)]
    return _load_cifar("cifar10", root, "cifar-10-batches-py", train, "test_batch",
                       "labels", 10, standardize)


@DATASETS.register("cifar100")
def load_cifar100(root: Path, standardize: bool = True) -> DataSplits:
    """CIFAR-100 with fine labels (50,000 / 10,000, ``(3, 32, 32)``) from
    ``root/cifar-100-python``."""
    return _load_cifar("cifar100", root, "cifar-100-python", ["train"], "test",
                       "fine_labels", 100, standardize)
