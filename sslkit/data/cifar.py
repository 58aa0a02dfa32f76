"""CIFAR-10/100 in torchvision's on-disk format (``cifar-10-batches-py`` / ``cifar-100-python``).

The batch files are pickles; they are read with an unpickler that only rebuilds numpy arrays and plain
containers, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from sslkit.data.base import DataError, TensorImageDataset
from sslkit.registry import DATASETS

_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


class _ArrayUnpickler(pickle.Unpickler):
    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")


def _read(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR file {path} is missing; re-extract the archive.") from None
    except Exception as e:  # noqa: BLE001
        raise DataError(f"CIFAR file {path} is corrupt or not a CIFAR batch ({e}); re-extract the archive.") from None


def _load(name: str, split: str, root: str | None) -> TensorImageDataset:
    folder, train_files, test_files, meta_file, names_key, labels_key = _LAYOUT[name]
    if split not in ("train", "test"):
        raise DataError(f"{name} split must be 'train' or 'test', got {split!r}")
    cls_name = name.upper()
    if root is None:
        raise DataError(f"{name} needs data.root: the folder that contains {folder}/ (torchvision's layout).")
    d = Path(root).expanduser() / folder
    if not d.is_dir():
        raise DataError(
            f"{name} not found: {d} does not exist. Download it once with `python -c \"import torchvision; "
            f"torchvision.datasets.{cls_name}('{Path(root).expanduser()}', download=True)\"` on a machine with "
            f"internet, or copy the extracted {folder}/ folder there."
        )
    data, labels = [], []
    for fname in train_files if split == "train" else test_files:
        entry = _read(d / fname)
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels += list(entry[labels_key])
    classes = [str(c) for c in _read(d / meta_file)[names_key]]
    images = torch.from_numpy(np.concatenate(data))
    return TensorImageDataset(images, torch.tensor(labels), classes, f"{name}/{split} ({d})")


@DATASETS.register("cifar10", help="CIFAR-10 32x32 colour, 10 classes, torchvision layout under data.root")
def cifar10(split: str = "train", root: str | None = None) -> TensorImageDataset:
    return _load("cifar10", split, root)


@DATASETS.register("cifar100", help="CIFAR-100 32x32 colour, 100 classes, torchvision layout under data.root")
def cifar100(split: str = "train", root: str | None = None) -> TensorImageDataset:
    return _load("cifar100", split, root)
