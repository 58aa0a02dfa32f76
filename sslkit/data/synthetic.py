"""Procedural images whose classes a network can learn: one shape family per class.

Each image draws its class's shape at a random position, scale and colour over a random textured
background, so colour carries no label information and crops keep the shape recognisable.
"""

from __future__ import annotations

import numpy as np
import torch

from sslkit.data.base import DataError, TensorImageDataset
from sslkit.registry import DATASETS

SHAPES = ["disc", "square", "ring", "cross", "hstripes", "vstripes", "checker", "diagonal", "triangle", "dots"]


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    inside = (np.abs(dy) < r) & (np.abs(dx) < r)
    period = max(r / 2.0, 1.5)
    if kind == "disc":
        return dy**2 + dx**2 < r**2
    if kind == "square":
        return inside
    if kind == "ring":
        d = np.sqrt(dy**2 + dx**2)
        return (d < r) & (d > 0.55 * r)
    if kind == "cross":
        return inside & ((np.abs(dy) < r / 3) | (np.abs(dx) < r / 3))
    if kind == "hstripes":
        return inside & ((dy // period) % 2 == 0)
    if kind == "vstripes":
        return inside & ((dx // period) % 2 == 0)
    if kind == "checker":
        return inside & (((dy // period) + (dx // period)) % 2 == 0)
    if kind == "diagonal":
        return inside & (((dy + dx) // period) % 2 == 0)
    if kind == "triangle":
        return inside & (dy > -r) & (np.abs(dx) < (dy + r) / 2)
    if kind == "dots":
        return inside & ((dy % period) < period / 2) & ((dx % period) < period / 2)
    raise ValueError(kind)


@DATASETS.register("synthetic", help="procedural shapes, one shape family per class, for tests and demos")
def synthetic(split: str = "train", root: str | None = None, num_samples: int = 1024, image_size: int = 32,
              num_classes: int = 10, seed: int = 0) -> TensorImageDataset:
    """``num_samples`` images of ``image_size`` px; train and test draw from different seeds."""
    if not 1 <= num_classes <= len(SHAPES):
        raise DataError(f"synthetic num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if image_size < 8 or num_samples < 1:
        raise DataError(f"synthetic needs image_size >= 8 and num_samples >= 1, got {image_size}, {num_samples}")
    rng = np.random.default_rng(seed * 2 + (split != "train"))
    s = image_size
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    labels = np.arange(num_samples) % num_classes
    rng.shuffle(labels)
    images = np.empty((num_samples, 3, s, s), dtype=np.uint8)
    for i, k in enumerate(labels):
        bg = rng.uniform(0, 120, size=3)[:, None, None] + rng.normal(0, 12, size=(3, s, s))
        fg = rng.uniform(135, 255, size=3)[:, None, None]
        r = rng.uniform(0.22, 0.4) * s
        cy, cx = rng.uniform(r * 0.8, s - r * 0.8, size=2)
        mask = _shape_mask(SHAPES[k], yy, xx, cy, cx, r)[None]
        img = np.where(mask, fg + rng.normal(0, 8, size=(3, s, s)), bg)
        images[i] = np.clip(img, 0, 255).astype(np.uint8)
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels), SHAPES[:num_classes],
                              f"synthetic/{split}")
