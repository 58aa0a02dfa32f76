from __future__ import annotations

import torch
from torch.utils.data import Dataset


class DataError(RuntimeError):
    """Missing or unreadable data; the message says where we looked and how to fix it."""


class ImageDataset(Dataset):
    """Interface: ``ds[i] -> (uint8 tensor (3, H, W), label)``; ``classes`` lists the class names."""

    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> torch.Tensor:  # pragma: no cover - overridden where cheap
        return torch.tensor([self[i][1] for i in range(len(self))])


class TensorImageDataset(ImageDataset):
    """A dataset held in memory as one uint8 tensor ``(N, C, H, W)``, C in {1, 3}.

    Grayscale images are expanded to 3 channels on access (a view, no copy). ``images`` gives the
    whole tensor for fast paths (feature extraction, batched augmentation).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], source: str) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DataError(f"{source}: expected uint8 images (N, 1|3, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise DataError(f"{source}: {len(images)} images but {len(labels)} labels")
        self._images = images
        self._labels = labels.long()
        self.classes = classes
        self.source = source

    def __len__(self) -> int:
        return len(self._images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self._images[i].expand(3, -1, -1), int(self._labels[i])

    @property
    def images(self) -> torch.Tensor:
        """All images as ``(N, 3, H, W)`` uint8 (expanded view for grayscale)."""
        return self._images.expand(-1, 3, -1, -1)

    @property
    def labels(self) -> torch.Tensor:
        return self._labels


def subset_dataset(ds: ImageDataset, n: int | None, seed: int = 0) -> ImageDataset:
    """A fixed random subset of ``n`` items (all of them when ``n`` is None or >= len)."""
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise DataError(f"subset must be positive, got {n}")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    if isinstance(ds, TensorImageDataset):
        sub = TensorImageDataset(ds._images[idx], ds._labels[idx], ds.classes, f"{ds.source}[subset {n}]")
    else:
        sub = torch.utils.data.Subset(ds, idx.tolist())
        sub.classes = ds.classes  # type: ignore[attr-defined]
    if getattr(ds, "skipped", None):  # files a preload could not read stay reported (the run's bad_files.txt)
        sub.skipped = ds.skipped  # type: ignore[attr-defined]
    return sub  # type: ignore[return-value]
