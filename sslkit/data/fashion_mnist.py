"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` or a torchvision-style root."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from sslkit.data.base import DataError, TensorImageDataset
from sslkit.registry import DATASETS

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {arr.size} bytes")
    return arr.reshape(shape)


def candidate_dirs(root: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        r = Path(root).expanduser()
        dirs += [r / "FashionMNIST" / "raw", r / "raw", r]
    env = os.environ.get("SSLKIT_FASHION_MNIST")
    if env:
        dirs.append(Path(env))
    dirs.append(DEBIAN_DIR)
    return dirs


def _find(d: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (d / name).is_file():
            return d / name
    return None


@DATASETS.register("fashion_mnist", help="Fashion-MNIST 28x28 grayscale, 10 classes (60k train / 10k test)")
def fashion_mnist(split: str = "train", root: str | None = None) -> TensorImageDataset:
    """Fashion-MNIST, read from ``root`` (torchvision layout or the bare IDX files) or the Debian location."""
    if split not in _FILES:
        raise DataError(f"fashion_mnist split must be 'train' or 'test', got {split!r}")
    img_stem, lbl_stem = _FILES[split]
    looked = candidate_dirs(root)
    for d in looked:
        img, lbl = _find(d, img_stem), _find(d, lbl_stem)
        if img and lbl:
            images = torch.from_numpy(read_idx(img).copy()).unsqueeze(1)  # (N, 1, 28, 28)
            labels = torch.from_numpy(read_idx(lbl).astype(np.int64))
            return TensorImageDataset(images, labels, CLASSES, f"fashion_mnist/{split} ({d})")
    raise DataError(
        f"Fashion-MNIST {split} files ({img_stem}[.gz], {lbl_stem}[.gz]) not found. Looked in: "
        + ", ".join(str(d) for d in looked)
        + ". Install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu; `make install` does "
        "this when run as root), or download with torchvision (`torchvision.datasets.FashionMNIST(ROOT, download=True)`) "
        "and pass data.root=ROOT."
    )
