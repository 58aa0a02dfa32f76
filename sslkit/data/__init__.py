"""Datasets that yield ``(uint8 image tensor (3, H, W), int label)``.

Every dataset is built through :data:`sslkit.registry.DATASETS` with a ``split`` ("train" or "test").
Unlabeled images get label ``-1``. Views are made later by :mod:`sslkit.augment`.
"""

from sslkit.data import (  # noqa: F401  (registration)
    cifar,
    fashion_mnist,
    image_folder,
    image_list,
    scenes,
    segmentation,
    shards,
    synthetic,
)
from sslkit.data.base import DataError, ImageDataset, TensorImageDataset, subset_dataset

__all__ = ["DataError", "ImageDataset", "TensorImageDataset", "subset_dataset"]
