"""CIFAR-10/100 in torchvision's on-disk format (``cifar-10-batches-py`` / ``cifar-100-python``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from sslkit.data.base import DataError, TensorImageDataset
from sslkit.registry import DATASETS


def _load(cls_name: str, folder: str, split: str, root: str | None) -> TensorImageDataset:
    import torchvision

    if split not in ("train", "test"):
        raise DataError(f"{cls_name.lower()} split must be 'train' or 'test', got {split!r}")
    if root is None:
        raise DataError(f"{cls_name} needs data.root: the folder that contains {folder}/ (torchvision's layout).")
    r = Path(root).expanduser()
    if not (r / folder).is_dir():
        raise DataError(
            f"{cls_name} not found: {r / folder} does not exist. Download it once with "
            f"`python -c \"import torchvision; torchvision.datasets.{cls_name}('{r}', download=True)\"` "
            f"on a machine with internet, or copy the extracted {folder}/ folder into {r}."
        )
    try:
        ds = getattr(torchvision.datasets, cls_name)(str(r), train=split == "train", download=False)
    except RuntimeError as e:  # torchvision's integrity check
        raise DataError(f"{cls_name} at {r / folder} is incomplete or corrupt ({e}). Re-extract it.") from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32)
    return TensorImageDataset(images, torch.tensor(ds.targets), list(ds.classes), f"{cls_name.lower()}/{split} ({r})")


@DATASETS.register("cifar10", help="CIFAR-10 32x32 colour, 10 classes, torchvision layout under data.root")
def cifar10(split: str = "train", root: str | None = None) -> TensorImageDataset:
    return _load("CIFAR10", "cifar-10-batches-py", split, root)


@DATASETS.register("cifar100", help="CIFAR-100 32x32 colour, 100 classes, torchvision layout under data.root")
def cifar100(split: str = "train", root: str | None = None) -> TensorImageDataset:
    return _load("CIFAR100", "cifar-100-python", split, root)
