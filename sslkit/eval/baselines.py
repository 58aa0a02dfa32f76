"""Raw pixels as a k-NN baseline on in-memory datasets: the figure pretraining has to beat.

Flattened uint8 pixels (one channel of gray images, whose three channels are copies) under the same protocols as an
encoder's features (:func:`sslkit.eval.knn.headline_protocols`). On Fashion-MNIST at k=20 with the full 60k bank:
86.1% centred on the bank's mean image (the published 85-86%), 84.6% uncentred.
"""

from __future__ import annotations

from typing import Any

import torch

from sslkit.eval.knn import headline_protocols


def pixel_features(ds: Any) -> torch.Tensor:
    """``(N, C*H*W)`` float pixels of a dataset holding ``images`` (N, 3, H, W) uint8; gray keeps one channel."""
    gray = bool((ds.images[:, 0] == ds.images[:, 1]).all())
    return (ds.images[:, :1] if gray else ds.images).float().flatten(1)


def pixel_knn(train_ds: Any, test_ds: Any, **protocol: Any) -> dict[str, float]:
    """:func:`headline_protocols` of raw pixels, its top-1 keys prefixed ``pixels_`` (``pixels_top1``,
    ``pixels_top1_uncentred``, ...); ``{}`` for datasets that are not held in memory."""
    if not (hasattr(train_ds, "images") and hasattr(test_ds, "images")):
        return {}
    res = headline_protocols(pixel_features(train_ds), train_ds.labels, pixel_features(test_ds), test_ds.labels,
                             **protocol)
    return {f"pixels_{key}": float(v) for key, v in res.items() if key.startswith("top1")}
